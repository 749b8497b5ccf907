//! Step 3 of loading: reading the files the config names (PEM files today) and checking that
//! they parse. Kept apart from parsing so that parsing does no I/O, and so a reload can run
//! this step on a blocking thread instead of a data-plane one.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Config, EtcdTlsConfig, Problem, Spanned};

/// What the config's files held when it was loaded.
#[derive(Debug, Clone, Default)]
pub struct Files {
    /// `etcd.tls`, when set.
    pub etcd_tls: Option<EtcdTlsFiles>,
}

/// The PEM files for TLS to etcd.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PemFile,
    /// The client certificate and its key, for mutual TLS.
    pub identity: Option<(PemFile, PemFile)>,
}

/// A PEM file: where it was, and what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: String,
    pub pem: Vec<u8>,
}

impl Files {
    pub(super) fn read(config: &Config) -> Result<Files, Problem> {
        let etcd_tls = match config.etcd.as_ref().and_then(|e| e.tls.as_ref()) {
            Some(tls) => Some(read_etcd_tls(tls)?),
            None => None,
        };
        Ok(Files { etcd_tls })
    }
}

fn read_etcd_tls(tls: &EtcdTlsConfig) -> Result<EtcdTlsFiles, Problem> {
    let ca = read_pem("etcd.tls.ca_file", &tls.ca_file)?;
    check_ca(&ca).map_err(|e| Problem::new("etcd.tls.ca_file", e).at(&tls.ca_file))?;
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let cert = read_pem("etcd.tls.cert_file", cert_path)?;
            let key = read_pem("etcd.tls.key_file", key_path)?;
            if CertificateDer::pem_slice_iter(&cert.pem).next().is_none() {
                let message = format!("{:?} holds no certificate", cert.path);
                return Err(Problem::new("etcd.tls.cert_file", message).at(cert_path));
            }
            PrivateKeyDer::from_pem_slice(&key.pem).map_err(|e| {
                let message = format!("{:?} holds no usable private key: {e}", key.path);
                Problem::new("etcd.tls.key_file", message).at(key_path)
            })?;
            Some((cert, key))
        }
        // Validation requires both or neither.
        _ => None,
    };
    Ok(EtcdTlsFiles { ca, identity })
}

fn read_pem(key: &str, path: &Spanned<String>) -> Result<PemFile, Problem> {
    let name = &path.value;
    let pem = std::fs::read(name)
        .map_err(|e| Problem::new(key, format!("cannot read {name:?}: {e}")).at(path))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        let message = format!("{name:?} is not a PEM file (no \"-----BEGIN\" line)");
        return Err(Problem::new(key, message).at(path));
    }
    Ok(PemFile {
        path: name.clone(),
        pem,
    })
}

/// The CA file must hold at least one certificate that parses as one: tonic would silently
/// drop one it cannot parse, leaving nothing to trust.
fn check_ca(ca: &PemFile) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca.pem) {
        let cert = cert.map_err(|e| format!("{:?}: not a PEM certificate: {e}", ca.path))?;
        roots
            .add(cert)
            .map_err(|e| format!("{:?}: not a CA certificate: {e}", ca.path))?;
    }
    if roots.is_empty() {
        return Err(format!("{:?} holds no certificate", ca.path));
    }
    Ok(())
}
