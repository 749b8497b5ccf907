//! Listener certificates: built at start, then reloaded without a restart, on SIGHUP and when
//! their files change on disk (read every `WATCH_EVERY`; cert-manager and certbot replace
//! files in place or swap symlinks, and both show as new contents). New handshakes use the new
//! certificate; established connections keep theirs. A bad new file is logged once and the
//! old certificate stays.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tracing::{error, info};

use crate::config::{read_listener_tls, Config, ListenerTls, ListenerTlsFiles};
use crate::telemetry::{metrics, CertificateOwner};
use crate::transport::tls::{ServerTls, ServerTlsPem};
use crate::BoxError;

/// How often the files are read for changes: a renewed certificate is served within this.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// What each listener serves with, in listener order (`None`: cleartext).
pub(super) type ListenerTlsList = Vec<Option<Arc<ServerTls>>>;

/// Every TLS listener's certificates.
pub(super) struct Certificates {
    listeners: Vec<ListenerCerts>,
}

struct ListenerCerts {
    name: String,
    index: usize,
    config: ListenerTls,
    tls: Arc<ServerTls>,
    /// The files in use, and the last set rejected (so a bad file is logged once).
    seen: Mutex<(ListenerTlsFiles, Option<ListenerTlsFiles>)>,
}

impl Certificates {
    /// Builds each TLS listener's server config from the files the config load read.
    /// Returns, in listener order, what each listener serves with.
    pub(super) fn build(config: &Config) -> Result<(Certificates, ListenerTlsList), BoxError> {
        let mut listeners = Vec::new();
        let mut per_listener = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let files = config.files.listener_tls.get(index).cloned().flatten();
            let (Some(tls_config), Some(files)) = (&listener.tls, files) else {
                per_listener.push(None);
                continue;
            };
            let name = listener.name.value.clone();
            let (tls, leaves) = ServerTls::new(&pem_of(&files))
                .map_err(|e| format!("listeners[{index}].tls ({name}): {e}"))?;
            publish_expiry(&name, &files, &leaves);
            let tls = Arc::new(tls);
            per_listener.push(Some(Arc::clone(&tls)));
            listeners.push(ListenerCerts {
                name,
                index,
                config: tls_config.clone(),
                tls,
                seen: Mutex::new((files, None)),
            });
        }
        Ok((Certificates { listeners }, per_listener))
    }

    /// Reads every listener's files again and serves new handshakes with those that
    /// changed and are good (blocking I/O: call off the data plane). `why` goes in the log.
    pub(super) fn reload_changed(&self, why: &str) {
        for listener in &self.listeners {
            listener.reload_if_changed(why);
        }
    }
}

impl ListenerCerts {
    fn reload_if_changed(&self, why: &str) {
        // Read under the lock: a watcher that read the old files must not apply them after a
        // SIGHUP applied the new ones.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let read = read_listener_tls(self.index, &self.config);
        let (applied, rejected) = &mut *seen;
        let files = match read {
            Ok(files) if files == *applied => return,
            Ok(files) => files,
            Err(problem) => {
                // Logged once per content of the bad files, not every few seconds.
                let bad = read_raw(&self.config);
                if rejected.as_ref() != Some(&bad) {
                    let problem = problem.in_file("the config");
                    error!(listener = %self.name, %problem, why,
                        "new TLS files rejected; the current certificate stays");
                    *rejected = Some(bad);
                }
                return;
            }
        };
        match self.tls.replace(&pem_of(&files)) {
            Ok(leaves) => {
                publish_expiry(&self.name, &files, &leaves);
                info!(listener = %self.name, why, "TLS certificates reloaded; new handshakes use them");
                *applied = files;
                *rejected = None;
            }
            Err(problem) => {
                if rejected.as_ref() != Some(&files) {
                    error!(listener = %self.name, %problem, why,
                        "new TLS files rejected; the current certificate stays");
                    *rejected = Some(files);
                }
            }
        }
    }
}

/// What the files hold now, as far as they can be read, to tell one bad version from the
/// next.
fn read_raw(config: &ListenerTls) -> ListenerTlsFiles {
    let read = |path: &str| crate::config::PemFile {
        path: path.to_string(),
        pem: std::fs::read(path).unwrap_or_default(),
    };
    ListenerTlsFiles {
        certificates: (config.pairs().into_iter())
            .map(|(c, k)| (read(&c.value), read(&k.value)))
            .collect(),
        client_ca: config.client_ca_file.as_ref().map(|f| read(&f.value)),
    }
}

fn pem_of(files: &ListenerTlsFiles) -> ServerTlsPem<'_> {
    ServerTlsPem {
        certificates: (files.certificates.iter())
            .map(|(cert, key)| (cert.pem.as_slice(), key.pem.as_slice()))
            .collect(),
        client_ca: files.client_ca.as_ref().map(|ca| ca.pem.as_slice()),
    }
}

fn publish_expiry(listener: &str, files: &ListenerTlsFiles, leaves: &[crate::certs::Described]) {
    for ((cert, _), leaf) in files.certificates.iter().zip(leaves) {
        let owner = CertificateOwner::Listener(listener);
        metrics().tls_certificate_expires(owner, &cert.path, leaf.not_after);
    }
}

/// Reads the certificate files every `WATCH_EVERY` and reloads those that changed.
pub(super) struct CertificateWatch {
    pub(super) certificates: Arc<Certificates>,
}

#[async_trait]
impl BackgroundService for CertificateWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if self.certificates.listeners.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let certificates = Arc::clone(&self.certificates);
                    let reading = tokio::task::spawn_blocking(move || {
                        certificates.reload_changed("the files changed");
                    });
                    let _ = reading.await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
