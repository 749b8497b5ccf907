//! Step 3 of loading: reading the files the config names (PEM files today) and checking that
//! they parse. Kept apart from parsing so that parsing does no I/O, and so a reload can run
//! this step on a blocking thread instead of a data-plane one.

use super::{Config, EtcdTlsConfig, ListenerTls, Problem, Spanned, UpstreamTls};
use crate::certs;

/// What the config's files held when it was loaded.
#[derive(Debug, Clone, Default)]
pub struct Files {
    /// `etcd.tls`, when set.
    pub etcd_tls: Option<EtcdTlsFiles>,
    /// Each listener's `tls`, in config order (`None`: cleartext).
    pub listener_tls: Vec<Option<ListenerTlsFiles>>,
    /// Each cluster's `tls`, in config order (`None`: cleartext).
    pub cluster_tls: Vec<Option<UpstreamTlsFiles>>,
}

/// The PEM files of one cluster's upstream TLS, each checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    /// The CA that signs the backends' certificates; `None`: the system's roots.
    pub ca: Option<PemFile>,
    /// A client certificate and its key, for mutual TLS to the backends.
    pub identity: Option<(PemFile, PemFile)>,
}

/// The PEM files of one listener's TLS, each checked: chains that parse, keys that match them,
/// a client CA that holds CA certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTlsFiles {
    /// Certificate chain and key, in config order: the first is the default.
    pub certificates: Vec<(PemFile, PemFile)>,
    pub client_ca: Option<PemFile>,
}

/// The PEM files for TLS to etcd.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PemFile,
    /// The client certificate and its key, for mutual TLS.
    pub identity: Option<(PemFile, PemFile)>,
}

/// A PEM file: where it was, and what it held.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: String,
    pub pem: Vec<u8>,
}

/// The path and size only: a private key must not reach a log through `{:?}`.
impl std::fmt::Debug for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemFile")
            .field("path", &self.path)
            .field("bytes", &self.pem.len())
            .finish()
    }
}

impl Files {
    pub(super) fn read(config: &Config) -> Result<Files, Problem> {
        let etcd_tls = match config.etcd.as_ref().and_then(|e| e.tls.as_ref()) {
            Some(tls) => Some(read_etcd_tls(tls)?),
            None => None,
        };
        let mut listener_tls = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            let files = listener.tls.as_ref().map(|tls| read_listener_tls(i, tls));
            listener_tls.push(files.transpose()?);
        }
        let mut cluster_tls = Vec::new();
        for (i, cluster) in config.clusters.iter().enumerate() {
            let files = cluster.tls.as_ref().map(|tls| read_upstream_tls(i, tls));
            cluster_tls.push(files.transpose()?);
        }
        if let Some(token_file) = config.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
            check_token_file(token_file)?;
        }
        Ok(Files {
            etcd_tls,
            listener_tls,
            cluster_tls,
        })
    }
}

/// `admin.token_file` can be read and holds a token. It is not kept: the admin endpoint reads
/// it at each mutation, so a new token takes effect without a reload.
fn check_token_file(path: &Spanned<String>) -> Result<(), Problem> {
    let at = "admin.token_file";
    match std::fs::read_to_string(&path.value) {
        Err(e) => {
            let message = format!("cannot read {:?}: {e}", path.value);
            Err(Problem::new(at, message).at(path))
        }
        Ok(token) if token.trim().is_empty() => {
            let message = format!("{:?} is empty: it must hold the bearer token", path.value);
            Err(Problem::new(at, message).at(path))
        }
        Ok(_) => Ok(()),
    }
}

/// Reads and checks the files of `clusters[i].tls` (at load, and again when they are
/// reloaded).
pub fn read_upstream_tls(i: usize, tls: &UpstreamTls) -> Result<UpstreamTlsFiles, Problem> {
    let at = format!("clusters[{i}].tls");
    let ca = match &tls.ca_file {
        Some(path) => Some(read_ca(&format!("{at}.ca_file"), path)?),
        None => None,
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(read_pair(&at, cert, key)?),
        // Validation requires both or neither.
        _ => None,
    };
    Ok(UpstreamTlsFiles { ca, identity })
}

/// Reads and checks the files of `listeners[i].tls` (at load, and again when they are
/// reloaded: SIGHUP, or a change on disk).
pub fn read_listener_tls(i: usize, tls: &ListenerTls) -> Result<ListenerTlsFiles, Problem> {
    let mut certificates = Vec::new();
    for (k, (cert_path, key_path)) in tls.pairs().into_iter().enumerate() {
        let at = match tls.certificates.is_empty() {
            true => format!("listeners[{i}].tls"),
            false => format!("listeners[{i}].tls.certificates[{k}]"),
        };
        certificates.push(read_pair(&at, cert_path, key_path)?);
    }
    let client_ca = match &tls.client_ca_file {
        Some(path) => Some(read_ca(
            &format!("listeners[{i}].tls.client_ca_file"),
            path,
        )?),
        None => None,
    };
    Ok(ListenerTlsFiles {
        certificates,
        client_ca,
    })
}

/// A certificate chain and its key, checked to belong together.
fn read_pair(
    at: &str,
    cert_path: &Spanned<String>,
    key_path: &Spanned<String>,
) -> Result<(PemFile, PemFile), Problem> {
    let cert = read_pem(&format!("{at}.cert_file"), cert_path)?;
    let key = read_pem(&format!("{at}.key_file"), key_path)?;
    if let Err(message) = certs::identity(&cert.pem, &key.pem) {
        let message = format!("{:?} and {:?}: {message}", cert.path, key.path);
        return Err(Problem::new(at, message).at(cert_path));
    }
    Ok((cert, key))
}

/// A CA file that holds CA certificates.
fn read_ca(at: &str, path: &Spanned<String>) -> Result<PemFile, Problem> {
    let ca = read_pem(at, path)?;
    certs::roots(&ca.pem).map_err(|e| Problem::new(at, format!("{:?}: {e}", ca.path)).at(path))?;
    Ok(ca)
}

fn read_etcd_tls(tls: &EtcdTlsConfig) -> Result<EtcdTlsFiles, Problem> {
    let ca = read_ca("etcd.tls.ca_file", &tls.ca_file)?;
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_path), Some(key_path)) => Some(read_pair("etcd.tls", cert_path, key_path)?),
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
