//! Certificates and keys from PEM, for every TLS sluice speaks (clients, backends, etcd):
//! parsing, the checks a config load runs (a chain that parses, a key that matches it, a CA
//! file that holds CA certificates), and what a certificate says (its names, its expiry, its
//! subject). Uses rustls with the ring provider, and x509-parser for the fields rustls does not
//! expose. Imports nothing from the crate: config checks files with it, transport builds TLS
//! with it.

use std::fmt::Write as _;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use x509_parser::extensions::GeneralName;

/// The one crypto provider: ring, as the rest of the dependency tree uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain with its private key, ready to serve, and what its leaf says.
#[derive(Debug, Clone)]
pub struct Identity {
    pub certified: Arc<CertifiedKey>,
    pub leaf: Described,
}

/// What a certificate says, as sluice uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described {
    /// The subject as an RFC 4514 string, last RDN first: `CN=client-a,O=Example`.
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// URI SANs (SPIFFE ids, for instance).
    pub uri: Vec<String>,
    /// notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl Described {
    /// The names SNI matches: the DNS SANs, or the common name when there are none.
    pub fn server_names(&self) -> Vec<String> {
        match (self.dns.is_empty(), &self.common_name) {
            (true, Some(cn)) => vec![cn.clone()],
            _ => self.dns.clone(),
        }
    }
}

/// Parses a certificate chain (leaf first) and its private key, and checks that they belong
/// together. Errors say which file is wrong and why.
pub fn identity(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, String> {
    let chain = chain(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key file holds no usable private key: {e}"))?;
    let leaf = describe(&chain[0])?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not belong to the certificate".to_string()
        }
        other => format!("the private key cannot be used: {other}"),
    })?;
    Ok(Identity {
        certified: Arc::new(certified),
        leaf,
    })
}

/// The certificates of a PEM file, in order; at least one.
pub fn chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file does not parse: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no certificate".to_string());
    }
    Ok(chain)
}

/// The trust anchors of a CA file: every certificate in it must parse as a trust anchor, and
/// there must be at least one (a CA file that parses to nothing would trust nothing). Whether
/// one is really a CA is not checked here: a leaf in a CA file simply vouches for nothing.
pub fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable trust anchor: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no certificate".to_string());
    }
    Ok(roots)
}

/// Reads a certificate's subject, names and expiry.
pub fn describe(cert: &CertificateDer<'_>) -> Result<Described, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let subject = parsed.subject();
    let mut described = Described {
        subject: rfc4514(subject),
        common_name: (subject.iter_common_name().next())
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        not_after: parsed.validity().not_after.timestamp(),
        ..Described::default()
    };
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => described.dns.push(dns.to_string()),
                GeneralName::URI(uri) => described.uri.push(uri.to_string()),
                _ => {}
            }
        }
    }
    Ok(described)
}

/// A distinguished name as RFC 4514 writes it: RDNs last first, `,` between them, `+`
/// within one, attribute names by their short form (`CN`, `O`, ...) or dotted OID, and
/// `,+"\<>;` (and a leading `#` or space) escaped in values.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = (name.iter_rdn().collect::<Vec<_>>().into_iter().rev())
        .map(|rdn| {
            let parts: Vec<String> = (rdn.iter())
                .map(|attr| {
                    let oid = attr.attr_type();
                    let key = x509_parser::objects::oid2abbrev(oid, registry)
                        .map_or_else(|_| oid.to_id_string(), str::to_string);
                    // RFC 4514: a value that is not a string is `#` and its bytes in hex.
                    let value = attr.as_str().map_or_else(
                        |_| format!("#{}", hex(attr.attr_value().data)),
                        escape_value,
                    );
                    format!("{key}={value}")
                })
                .collect();
            parts.join("+")
        })
        .collect();
    rdns.join(",")
}

/// `bytes` as lowercase hex digits.
pub fn hex(bytes: &[u8]) -> String {
    let mut digits = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        let _ = write!(digits, "{byte:02x}");
    }
    digits
}

fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let leading = i == 0 && (c == '#' || c == ' ');
        if leading || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether `name` (from SNI) is one of `patterns`: an exact DNS name (any case), or a
/// `*.example.com` wildcard for one label.
pub fn name_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|pattern| {
        if let Some(suffix) = pattern.strip_prefix("*.") {
            name.split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
        } else {
            pattern.eq_ignore_ascii_case(name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_match_exactly_or_by_one_wildcard_label() {
        let names = vec!["api.example.com".to_string(), "*.svc.local".to_string()];
        assert!(name_matches(&names, "API.example.com"));
        assert!(name_matches(&names, "echo.svc.local"));
        assert!(!name_matches(&names, "a.b.svc.local"));
        assert!(!name_matches(&names, "svc.local"));
        assert!(!name_matches(&names, "example.com"));
    }

    #[test]
    fn subjects_are_written_as_rfc_4514_and_the_cn_serves_sni_without_sans() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme, Inc.");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client-a");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let described = describe(cert.der()).unwrap();
        assert_eq!(described.subject, "CN=client-a,O=Acme\\, Inc.");
        assert!(described.dns.is_empty());
        assert_eq!(described.server_names(), ["client-a"]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(chain(b"").unwrap_err().contains("no certificate"));
        assert!(roots(b"").unwrap_err().contains("no certificate"));
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let cert_pem = cert.cert.pem();
        let ok = identity(
            cert_pem.as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        );
        let ok = ok.unwrap();
        assert_eq!(ok.leaf.dns, ["a.test"]);
        assert_eq!(ok.leaf.server_names(), ["a.test"]);
        assert!(ok.leaf.not_after > 0);
        let mismatch = identity(
            cert_pem.as_bytes(),
            other.signing_key.serialize_pem().as_bytes(),
        );
        assert!(mismatch.unwrap_err().contains("does not belong"));
        let no_key = identity(cert_pem.as_bytes(), cert_pem.as_bytes());
        assert!(no_key.unwrap_err().contains("no usable private key"));
    }
}
