//! TLS to the backends: a cluster's rustls client config ([`ClientTls`]), built with `certs`.
//! (The listener side is `proxy/listener_tls.rs`.)

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::certs;

/// The PEM contents of a cluster's upstream TLS files.
pub struct ClientTlsPem<'a> {
    /// The CA that signs the backends' certificates; `None`: the system's trust store.
    pub ca: Option<&'a [u8]>,
    /// A client certificate chain and key (mTLS to the backends).
    pub identity: Option<(&'a [u8], &'a [u8])>,
    /// The name to check instead of the backend's host.
    pub server_name: Option<&'a str>,
}

/// TLS to one cluster's backends: ALPN `h2`, the backend's certificate checked against the
/// CA (or the system's roots) for its host or `server_name`. New files can replace the CA and
/// client certificate in place ([`ClientTls::replace`]): new connections use them,
/// established ones keep theirs. Two are equal when they were built from the same files and
/// name (a config reload that changes them must not reuse the connections of the old setup).
#[derive(Debug)]
pub struct ClientTls {
    current: ArcSwap<BuiltClient>,
    server_name: Option<ServerName<'static>>,
}

#[derive(Debug)]
struct BuiltClient {
    config: Arc<ClientConfig>,
    /// SHA-256 over what it was built from.
    fingerprint: Vec<u8>,
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &ClientTls) -> bool {
        self.current.load().fingerprint == other.current.load().fingerprint
    }
}

impl ClientTls {
    /// Builds the client config; returns it with the client certificate's leaf, if any (for
    /// the expiry metric).
    pub fn new(pem: &ClientTlsPem<'_>) -> Result<(ClientTls, Option<certs::Described>), String> {
        let (built, leaf) = client_config(pem)?;
        let server_name = match pem.server_name {
            Some(name) => Some(
                ServerName::try_from(name.to_string())
                    .map_err(|_| format!("server_name {name:?} is not a DNS name or IP"))?,
            ),
            None => None,
        };
        let tls = ClientTls {
            current: ArcSwap::from_pointee(built),
            server_name,
        };
        Ok((tls, leaf))
    }

    /// New connections use the CA and client certificate in `pem` (its `server_name` is
    /// ignored: that comes from the config); on error, the old ones stay.
    pub fn replace(&self, pem: &ClientTlsPem<'_>) -> Result<Option<certs::Described>, String> {
        let (built, leaf) = client_config(pem)?;
        self.current.store(Arc::new(built));
        Ok(leaf)
    }

    /// The client side of a handshake with the backend at `addr` (`HOST:PORT`).
    pub async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_name(addr)?,
        };
        TlsConnector::from(Arc::clone(&self.current.load().config))
            .connect(name, tcp)
            .await
    }
}

fn client_config(
    pem: &ClientTlsPem<'_>,
) -> Result<(BuiltClient, Option<certs::Described>), String> {
    let roots = match pem.ca {
        Some(ca) => certs::roots(ca).map_err(|e| format!("ca_file: {e}"))?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let (mut config, leaf) = match pem.identity {
        Some((cert, key)) => {
            let identity = certs::identity(cert, key)?;
            let chain = identity.certified.cert.clone();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("the key file holds no usable private key: {e}"))?;
            let config = builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?;
            (config, Some(identity.leaf))
        }
        None => (builder.with_no_client_auth(), None),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let built = BuiltClient {
        config: Arc::new(config),
        fingerprint: fingerprint(pem),
    };
    Ok((built, leaf))
}

fn fingerprint(pem: &ClientTlsPem<'_>) -> Vec<u8> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let (cert, key) = pem.identity.unwrap_or_default();
    for part in [
        pem.ca.unwrap_or_default(),
        cert,
        key,
        pem.server_name.unwrap_or("").as_bytes(),
    ] {
        // Length first, so the parts cannot run into each other.
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part);
    }
    // `None` CA (the system's roots) differs from an empty file.
    context.update(&[u8::from(pem.ca.is_some())]);
    context.finish().as_ref().to_vec()
}

/// The host of `HOST:PORT` (`[v6]:PORT` too) as the name to check.
fn host_name(addr: &str) -> std::io::Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| {
        let message =
            format!("{host:?} is not a name TLS can check; set clusters[].tls.server_name");
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
    })
}

/// The system's trust store (rustls-native-certs): what `ca_file` defaults to.
fn system_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("no ca_file, and the system's trust store holds no usable certificate".into());
    }
    Ok(roots)
}
