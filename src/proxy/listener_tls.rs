//! TLS on the listener side: a listener's rustls server config (TLS 1.2 and 1.3, ALPN `h2`
//! only, certificates chosen by SNI, client certificates when a client CA is set), swapped
//! whole when its files change, and the verified client identity of a connection (and its
//! XFCC form).

use std::fmt::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::certs::{self, Identity};
use crate::telemetry::HandshakeFailure;

/// The PEM contents of a listener's TLS files.
pub struct ServerTlsPem<'a> {
    /// Certificate chain and key, the first the default.
    pub certificates: Vec<(&'a [u8], &'a [u8])>,
    pub client_ca: Option<&'a [u8]>,
}

/// One listener's TLS: the current server config. Handshakes load it; a reload stores a new
/// one, which new handshakes use while established connections keep theirs.
pub struct ServerTls {
    config: ArcSwap<ServerConfig>,
    /// ALPN offers `http/1.1` after `h2`: the listener serves gRPC-Web over HTTP/1.1 too.
    http1: bool,
}

/// Why a handshake failed, from what rustls said.
fn failure_of(error: &std::io::Error) -> HandshakeFailure {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::NoApplicationProtocol) => HandshakeFailure::NoH2,
        Some(rustls::Error::NoCertificatesPresented)
        | Some(rustls::Error::InvalidCertificate(_)) => HandshakeFailure::ClientCertificate,
        _ => HandshakeFailure::Protocol,
    }
}

impl ServerTls {
    /// Builds the server config; returns it with each certificate's leaf (for the expiry
    /// metric), or why the files cannot serve.
    /// `http1`: offer `http/1.1` in ALPN after `h2` (a listener with `grpc_web`).
    pub fn new(
        pem: &ServerTlsPem<'_>,
        http1: bool,
    ) -> Result<(ServerTls, Vec<certs::Described>), String> {
        let (config, leaves) = server_config(pem, http1)?;
        let tls = ServerTls {
            config: ArcSwap::from_pointee(config),
            http1,
        };
        Ok((tls, leaves))
    }

    /// Serves new handshakes with new files; on error, the old ones stay.
    pub fn replace(&self, pem: &ServerTlsPem<'_>) -> Result<Vec<certs::Described>, String> {
        let (config, leaves) = server_config(pem, self.http1)?;
        self.config.store(Arc::new(config));
        Ok(leaves)
    }

    /// Runs the server side of a handshake on `io`; returns the stream and what the client's
    /// certificate, if it sent one, says.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(TlsStream<IO>, ClientIdentity), HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.config.load_full());
        let stream = acceptor.accept(io).await.map_err(|e| failure_of(&e))?;
        let leaf = (stream.get_ref().1.peer_certificates()).and_then(|chain| chain.first());
        let identity = match leaf.map(ClientCert::of) {
            None => ClientIdentity::None,
            Some(Ok(cert)) => ClientIdentity::Verified(cert),
            Some(Err(error)) => ClientIdentity::Unreadable(error),
        };
        Ok((stream, identity))
    }
}

fn server_config(
    pem: &ServerTlsPem<'_>,
    http1: bool,
) -> Result<(ServerConfig, Vec<certs::Described>), String> {
    let mut identities = Vec::new();
    for (k, (cert, key)) in pem.certificates.iter().enumerate() {
        identities.push(certs::identity(cert, key).map_err(|e| format!("certificate {k}: {e}"))?);
    }
    let leaves = identities.iter().map(|i| i.leaf.clone()).collect();
    let resolver = SniResolver::new(identities).ok_or("no certificate")?;
    let provider = certs::provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match pem.client_ca {
        Some(ca) => {
            let roots = certs::roots(ca).map_err(|e| format!("client CA: {e}"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    // Only HTTP/2, unless gRPC-Web is served: a client that offers only http/1.1 then gets a
    // no_application_protocol alert.
    config.alpn_protocols = vec![b"h2".to_vec()];
    if http1 {
        config.alpn_protocols.push(b"http/1.1".to_vec());
    }
    Ok((config, leaves))
}

/// Picks the certificate whose names match the client's SNI; the first one otherwise.
#[derive(Debug)]
struct SniResolver {
    by_names: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl SniResolver {
    fn new(identities: Vec<Identity>) -> Option<SniResolver> {
        let by_names: Vec<_> = (identities.into_iter())
            .map(|i| (i.leaf.server_names(), i.certified))
            .collect();
        (!by_names.is_empty()).then_some(SniResolver { by_names })
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|name| {
            (self.by_names.iter()).find(|(names, _)| certs::name_matches(names, name))
        });
        chosen
            .or(self.by_names.first())
            .map(|(_, key)| Arc::clone(key))
    }
}

/// What a TLS client showed of itself.
#[derive(Debug)]
pub enum ClientIdentity {
    /// No certificate (the listener asks for none).
    None,
    Verified(ClientCert),
    /// Verified by the client CA, but its fields could not be read.
    Unreadable(String),
}

/// A client's verified certificate: who it says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub subject: String,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub hash: String,
}

impl ClientCert {
    fn of(leaf: &rustls::pki_types::CertificateDer<'_>) -> Result<ClientCert, String> {
        let described = certs::describe(leaf)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
        Ok(ClientCert {
            subject: described.subject,
            dns: described.dns,
            uri: described.uri,
            hash: certs::hex(digest.as_ref()),
        })
    }

    /// Who the certificate names, for `client_key: tls_identity`: its first URI SAN (a SPIFFE
    /// id), else its first DNS SAN, else its subject.
    pub fn identity(&self) -> &str {
        (self.uri.first().or(self.dns.first())).map_or(&self.subject, |name| name)
    }

    /// The identity in Envoy's `x-forwarded-client-cert` format:
    /// `Hash=...;Subject="...";URI=...;DNS=...` (one `URI=`/`DNS=` per name). The subject is
    /// always quoted, a name when it holds `,`, `;`, `=` or `"`, with quotes and backslashes
    /// escaped inside: a crafted name cannot add fields.
    pub fn xfcc(&self) -> String {
        let mut value = format!("Hash={};Subject={}", self.hash, quoted(&self.subject));
        for uri in &self.uri {
            let _ = write!(value, ";URI={}", quote_if_needed(uri));
        }
        for dns in &self.dns {
            let _ = write!(value, ";DNS={}", quote_if_needed(dns));
        }
        value
    }

    /// The SANs, for the access log: `DNS:name` and `URI:uri`.
    pub fn sans(&self) -> Vec<String> {
        let dns = self.dns.iter().map(|d| format!("DNS:{d}"));
        dns.chain(self.uri.iter().map(|u| format!("URI:{u}")))
            .collect()
    }
}

fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

fn quote_if_needed(value: &str) -> String {
    if value.contains([',', ';', '=', '"', '\\']) {
        quoted(value)
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crafted_name_cannot_add_xfcc_fields() {
        let cert = ClientCert {
            subject: "CN=a".into(),
            dns: vec![],
            uri: vec!["spiffe://x;By=evil".into()],
            hash: "ab".into(),
        };
        assert_eq!(
            cert.xfcc(),
            "Hash=ab;Subject=\"CN=a\";URI=\"spiffe://x;By=evil\""
        );
    }

    #[test]
    fn xfcc_follows_envoys_format() {
        let cert = ClientCert {
            subject: "CN=client,O=Say \"hi\"".into(),
            dns: vec!["client.test".into()],
            uri: vec!["spiffe://test/client".into()],
            hash: "ab".into(),
        };
        assert_eq!(
            cert.xfcc(),
            "Hash=ab;Subject=\"CN=client,O=Say \\\"hi\\\"\";URI=spiffe://test/client;DNS=client.test"
        );
        assert_eq!(cert.sans(), ["DNS:client.test", "URI:spiffe://test/client"]);
    }
}
