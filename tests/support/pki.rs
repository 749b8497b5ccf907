//! Test certificates, made here with rcgen: a CA, server certificates for given names, client
//! certificates, written as PEM files into a directory. Nothing comes from elsewhere.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A CA that signs server and client certificates.
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate chain and key, as PEM, and where they were written.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate to `dir/<file>`; returns the path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, &self.cert_pem).expect("write CA");
        path
    }

    /// A server certificate for `names` (DNS names), written as `dir/<stem>.pem` and
    /// `dir/<stem>.key`.
    pub fn server(&self, dir: &Path, stem: &str, names: &[&str]) -> Issued {
        self.issue(dir, stem, names, None, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn` and, optionally, a URI SAN.
    pub fn client(&self, dir: &Path, stem: &str, cn: &str, uri: Option<&str>) -> Issued {
        self.issue(
            dir,
            stem,
            &[],
            Some((cn, uri)),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        client: Option<(&str, Option<&str>)>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        if let Some((cn, uri)) = client {
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(uri) = uri {
                let uri = uri.try_into().expect("URI SAN");
                params.subject_alt_names.push(SanType::URI(uri));
            }
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_file: dir.join(format!("{stem}.pem")),
            key_file: dir.join(format!("{stem}.key")),
        };
        issued.write_to(&issued.cert_file, &issued.key_file);
        issued
    }
}

impl Issued {
    /// Writes the chain and key to these paths (a rotation writes another certificate over
    /// the files a listener uses).
    pub fn write_to(&self, cert_file: &Path, key_file: &Path) {
        std::fs::write(cert_file, &self.cert_pem).expect("write certificate");
        std::fs::write(key_file, &self.key_pem).expect("write key");
    }
}
