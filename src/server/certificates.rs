//! TLS certificates: each listener's, and each cluster's CA and client certificate. Built
//! with the config, then reloaded without a restart, on SIGHUP and when their files change on
//! disk (read every `WATCH_EVERY`; cert-manager and certbot replace files in place or swap
//! symlinks, and both show as new contents). New handshakes use the new files; established
//! connections keep theirs. A bad new file is logged once and the old certificate stays.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tracing::{error, info};

use crate::balance::Clusters;
use crate::config::{
    read_listener_tls, read_upstream_tls, Config, ListenerTls, ListenerTlsFiles, PemFile, Problem,
    UpstreamTls, UpstreamTlsFiles,
};
use crate::proxy::listener_tls::{ServerTls, ServerTlsPem};
use crate::sync::lock;
use crate::telemetry::{metrics, CertificateOwner};
use crate::transport::tls::{ClientTls, ClientTlsPem};
use crate::BoxError;

/// How often the files are read for changes: a renewed certificate is served within this.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// What each listener serves with, in listener order (`None`: cleartext).
pub(super) type ListenerTlsList = Vec<Option<Arc<ServerTls>>>;

/// Every TLS listener's and TLS cluster's certificates.
pub(super) struct Certificates {
    listeners: Vec<Watched<ListenerCerts>>,
    /// The current router's clusters; replaced when a config reload builds a new router.
    clusters: Mutex<Vec<Arc<Watched<ClusterCerts>>>>,
}

/// One owner's files: those in use, and the last set rejected (so a bad file is logged once).
struct Watched<T: Reloadable> {
    owner: T,
    seen: Mutex<(T::Files, Option<T::Files>)>,
    /// A config reload replaced this cluster: a watcher pass still holding it must not
    /// publish its certificate's expiry again (the new generation owns the series).
    retired: AtomicBool,
}

/// Whose files, for the log: `listener=NAME` or `cluster=NAME`.
enum Owner<'a> {
    Listener(&'a str),
    Cluster(&'a str),
}

/// Something that serves with TLS files and can take new ones.
trait Reloadable {
    type Files: PartialEq;
    fn who(&self) -> Owner<'_>;
    /// Reads and checks the files.
    fn read(&self) -> Result<Self::Files, Problem>;
    /// What the files hold, as far as they can be read (to tell one bad version from the next).
    fn read_raw(&self) -> Self::Files;
    /// Uses `files` for new handshakes, and publishes their expiry.
    fn apply(&self, files: &Self::Files) -> Result<(), String>;
}

struct ListenerCerts {
    name: String,
    index: usize,
    config: ListenerTls,
    tls: Arc<ServerTls>,
}

struct ClusterCerts {
    name: String,
    index: usize,
    config: UpstreamTls,
    tls: Arc<ClientTls>,
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
            let http1 = listener.grpc_web.is_some();
            let (tls, leaves) = ServerTls::new(&listener_pem(&files), http1)
                .map_err(|e| format!("listeners[{index}].tls ({name}): {e}"))?;
            publish_listener_expiry(&name, &files, &leaves);
            let tls = Arc::new(tls);
            per_listener.push(Some(Arc::clone(&tls)));
            let owner = ListenerCerts {
                name,
                index,
                config: tls_config.clone(),
                tls,
            };
            listeners.push(Watched::new(owner, files));
        }
        let certificates = Certificates {
            listeners,
            clusters: Mutex::new(Vec::new()),
        };
        Ok((certificates, per_listener))
    }

    /// Watches the TLS files of `clusters`, built from `config`, from now on.
    pub(super) fn watch_clusters(&self, config: &Config, clusters: &Clusters) {
        let mut watched = Vec::new();
        for (index, cluster) in config.clusters.iter().enumerate() {
            let name = &cluster.name.value;
            let tls = clusters
                .by_name(name)
                .and_then(|c| c.settings.upstream.tls.clone());
            let files = config.files.cluster_tls.get(index).cloned().flatten();
            if let (Some(tls), Some(config), Some(files)) = (tls, &cluster.tls, files) {
                let owner = ClusterCerts {
                    name: name.clone(),
                    index,
                    config: config.clone(),
                    tls,
                };
                watched.push(Arc::new(Watched::new(owner, files)));
            }
        }
        let old = std::mem::replace(&mut *lock(&self.clusters), watched);
        for cluster in old {
            cluster.retired.store(true, Ordering::Relaxed);
        }
    }

    /// Reads every listener's and cluster's files again and uses those that changed and are
    /// good (blocking I/O: call off the data plane). `why` goes in the log.
    pub(super) fn reload_changed(&self, why: &str) {
        for listener in &self.listeners {
            listener.reload_if_changed(why);
        }
        let clusters = lock(&self.clusters).clone();
        for cluster in clusters {
            cluster.reload_if_changed(why);
        }
    }
}

impl<T: Reloadable> Watched<T> {
    fn new(owner: T, files: T::Files) -> Watched<T> {
        Watched {
            owner,
            seen: Mutex::new((files, None)),
            retired: AtomicBool::new(false),
        }
    }

    fn reload_if_changed(&self, why: &str) {
        // Read under the lock: a watcher that read the old files must not apply them after a
        // SIGHUP applied the new ones.
        let mut seen = lock(&self.seen);
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let (applied, rejected) = &mut *seen;
        let who = self.owner.who();
        let files = match self.owner.read() {
            Ok(files) if files == *applied => return,
            Ok(files) => files,
            Err(problem) => {
                // Logged once per content of the bad files, not every few seconds.
                let bad = self.owner.read_raw();
                if rejected.as_ref() != Some(&bad) {
                    rejected_log(&who, &problem.in_file("the config"), why);
                    *rejected = Some(bad);
                }
                return;
            }
        };
        match self.owner.apply(&files) {
            Ok(()) => {
                match who {
                    Owner::Listener(listener) => info!(listener = %listener, why, "{RELOADED}"),
                    Owner::Cluster(cluster) => info!(cluster = %cluster, why, "{RELOADED}"),
                }
                *applied = files;
                *rejected = None;
            }
            Err(problem) => {
                if rejected.as_ref() != Some(&files) {
                    rejected_log(&who, &problem, why);
                    *rejected = Some(files);
                }
            }
        }
    }
}

const RELOADED: &str = "TLS certificates reloaded; new handshakes use them";
const REJECTED: &str = "new TLS files rejected; the current certificate stays";

fn rejected_log(who: &Owner<'_>, problem: &dyn std::fmt::Display, why: &str) {
    match who {
        Owner::Listener(listener) => error!(listener = %listener, %problem, why, "{REJECTED}"),
        Owner::Cluster(cluster) => error!(cluster = %cluster, %problem, why, "{REJECTED}"),
    }
}

impl Reloadable for ListenerCerts {
    type Files = ListenerTlsFiles;

    fn who(&self) -> Owner<'_> {
        Owner::Listener(&self.name)
    }

    fn read(&self) -> Result<ListenerTlsFiles, Problem> {
        read_listener_tls(self.index, &self.config)
    }

    fn read_raw(&self) -> ListenerTlsFiles {
        ListenerTlsFiles {
            certificates: (self.config.pairs().into_iter())
                .map(|(c, k)| (read_raw(&c.value), read_raw(&k.value)))
                .collect(),
            client_ca: self
                .config
                .client_ca_file
                .as_ref()
                .map(|f| read_raw(&f.value)),
        }
    }

    fn apply(&self, files: &ListenerTlsFiles) -> Result<(), String> {
        let leaves = self.tls.replace(&listener_pem(files))?;
        publish_listener_expiry(&self.name, files, &leaves);
        Ok(())
    }
}

impl Reloadable for ClusterCerts {
    type Files = UpstreamTlsFiles;

    fn who(&self) -> Owner<'_> {
        Owner::Cluster(&self.name)
    }

    fn read(&self) -> Result<UpstreamTlsFiles, Problem> {
        read_upstream_tls(self.index, &self.config)
    }

    fn read_raw(&self) -> UpstreamTlsFiles {
        let pair = match (&self.config.cert_file, &self.config.key_file) {
            (Some(c), Some(k)) => Some((read_raw(&c.value), read_raw(&k.value))),
            _ => None,
        };
        UpstreamTlsFiles {
            ca: self.config.ca_file.as_ref().map(|f| read_raw(&f.value)),
            identity: pair,
        }
    }

    fn apply(&self, files: &UpstreamTlsFiles) -> Result<(), String> {
        let server_name = self.config.server_name.as_ref().map(|n| n.0.as_str());
        let leaf = self.tls.replace(&cluster_pem(files, server_name))?;
        if let (Some(leaf), Some((cert, _))) = (leaf, &files.identity) {
            let owner = CertificateOwner::Cluster(&self.name);
            metrics().tls_certificate_expires(owner, &cert.path, leaf.not_after);
        }
        Ok(())
    }
}

fn read_raw(path: &str) -> PemFile {
    PemFile {
        path: path.to_string(),
        pem: std::fs::read(path).unwrap_or_default(),
    }
}

fn listener_pem(files: &ListenerTlsFiles) -> ServerTlsPem<'_> {
    ServerTlsPem {
        certificates: (files.certificates.iter())
            .map(|(cert, key)| (cert.pem.as_slice(), key.pem.as_slice()))
            .collect(),
        client_ca: files.client_ca.as_ref().map(|ca| ca.pem.as_slice()),
    }
}

/// The PEM of a cluster's files, with the config's `server_name`.
pub(super) fn cluster_pem<'a>(
    files: &'a UpstreamTlsFiles,
    server_name: Option<&'a str>,
) -> ClientTlsPem<'a> {
    ClientTlsPem {
        ca: files.ca.as_ref().map(|ca| ca.pem.as_slice()),
        identity: (files.identity.as_ref()).map(|(c, k)| (c.pem.as_slice(), k.pem.as_slice())),
        server_name,
    }
}

fn publish_listener_expiry(
    listener: &str,
    files: &ListenerTlsFiles,
    leaves: &[crate::certs::Described],
) {
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
