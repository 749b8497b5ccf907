//! Certificate and key files for the demo's TLS: `echo-backend --tls-cert/--tls-key`,
//! `demo-client --cert/--key/--ca`.

use std::path::{Path, PathBuf};

use tonic::transport::Identity;

use crate::BoxError;

/// A certificate chain and its key, as PEM files (`--tls-cert`/`--tls-key`, `--cert`/`--key`).
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PemPair {
    /// Both or neither: one without the other is an error naming the flags.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        flags: &str,
    ) -> Result<Option<PemPair>, BoxError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(PemPair { cert, key })),
            (None, None) => Ok(None),
            _ => Err(format!("{flags}: give both, or neither").into()),
        }
    }

    pub(super) fn identity(&self) -> Result<Identity, BoxError> {
        Ok(Identity::from_pem(
            read_pem(&self.cert)?,
            read_pem(&self.key)?,
        ))
    }
}

/// A PEM file's bytes; the error names the file.
pub(super) fn read_pem(path: &Path) -> Result<Vec<u8>, BoxError> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()).into())
}
