//! Discovery sources push whole backend sets into clusters ([`Cluster::update`]).
//!
//! A closed set, one file each: `static` lists come from the config and are applied once;
//! `etcd` prefixes are watched by a task each ([`etcd`]), decoded by [`formats`]. The watch
//! tasks run on one small runtime of their own, off the data plane's threads, and stop when
//! the [`Watchers`] handle that started them is dropped (on reload, after the new ones start).

mod etcd;
pub mod formats;
mod static_list;

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::balance::{Cluster, Endpoint};
use crate::config::{ClusterConfig, DiscoveryConfig, EtcdConfig};

pub use etcd::{connect as etcd_connect, tls_options as etcd_tls_options};

/// Where a cluster's backends come from and how that source is doing, for `/backends`.
#[derive(Debug)]
pub struct DiscoveryStatus {
    /// `static` or `etcd`.
    pub source: &'static str,
    /// The etcd prefix watched, without the trailing slash.
    pub prefix: Option<String>,
    /// A [`SourceState`], as its number.
    state: AtomicU8,
    /// The etcd revision the backend set reflects.
    revision: AtomicI64,
    /// Why the source last failed, kept until it answers again (cold path).
    last_error: Mutex<Option<String>>,
    invalid_values: AtomicI64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    /// Started, no answer yet.
    Connecting = 0,
    Connected = 1,
    /// Failed since it last answered: the cluster routes on its last known set.
    Unreachable = 2,
}

/// What `/backends` shows of a cluster's discovery.
#[derive(Debug, Serialize)]
pub struct DiscoveryView {
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `connecting` (no answer yet), `connected`, or `unreachable` (routing on the last
    /// known set).
    pub state: &'static str,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl DiscoveryStatus {
    pub fn new(config: &DiscoveryConfig) -> DiscoveryStatus {
        let (source, prefix) = match &config.etcd {
            Some(etcd) => ("etcd", Some(etcd.prefix.clone())),
            None => ("static", None),
        };
        DiscoveryStatus {
            source,
            prefix,
            state: AtomicU8::new(if source == "static" {
                SourceState::Connected
            } else {
                SourceState::Connecting
            } as u8),
            revision: AtomicI64::new(0),
            last_error: Mutex::new(None),
            invalid_values: AtomicI64::new(0),
        }
    }

    fn state(&self) -> SourceState {
        match self.state.load(Ordering::Acquire) {
            0 => SourceState::Connecting,
            1 => SourceState::Connected,
            _ => SourceState::Unreachable,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state() == SourceState::Connected
    }

    fn set_connected(&self) {
        self.state
            .store(SourceState::Connected as u8, Ordering::Release);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn set_failed(&self, error: String) {
        self.state
            .store(SourceState::Unreachable as u8, Ordering::Release);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Keys under the prefix skipped because their value could not be decoded.
    pub fn invalid_values(&self) -> i64 {
        self.invalid_values.load(Ordering::Relaxed)
    }

    fn set_invalid_values(&self, count: usize) {
        self.invalid_values.store(count as i64, Ordering::Relaxed);
    }

    fn set_revision(&self, revision: i64) {
        self.revision.store(revision, Ordering::Release);
    }

    pub fn view(&self) -> DiscoveryView {
        let revision = self.revision.load(Ordering::Acquire);
        DiscoveryView {
            source: self.source,
            prefix: self.prefix.clone(),
            state: match self.state() {
                SourceState::Connecting => "connecting",
                SourceState::Connected => "connected",
                SourceState::Unreachable => "unreachable",
            },
            connected: self.is_connected(),
            revision: (revision > 0).then_some(revision),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// Applies a whole backend set to a cluster, with its log line and count.
fn apply(cluster: &Cluster, endpoints: &[Endpoint]) {
    let source = cluster.discovery.source;
    let before = cluster.backends().backends.len();
    if cluster.update(endpoints, source) {
        info!(
            cluster = %cluster.name,
            source,
            backends = endpoints.len(),
            before,
            "backend set updated"
        );
        cluster.stats.discovery_updated();
    }
}

/// The running watch tasks of one config generation; dropping it stops them.
#[derive(Debug, Default)]
pub struct Watchers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts feeding each cluster from the source its config names: a static list at once, an
/// etcd prefix from a watch task.
pub fn start(clusters: &[(Arc<Cluster>, &ClusterConfig)], etcd: Option<&EtcdConfig>) -> Watchers {
    let mut watchers = Watchers::default();
    for (cluster, config) in clusters {
        if let Some(list) = &config.discovery.static_ {
            static_list::apply(cluster, list);
        }
        if let (Some(source), Some(etcd)) = (&config.discovery.etcd, etcd) {
            match runtime() {
                Ok(runtime) => {
                    let task = etcd::watch(Arc::clone(cluster), etcd.clone(), source.clone());
                    watchers.tasks.push(runtime.spawn(task));
                }
                // The cluster stays unready (`/readyz` 503) rather than the process panicking;
                // the next reload tries again.
                Err(error) => error!(
                    cluster = %cluster.name,
                    %error,
                    "cannot start the etcd discovery runtime; the cluster gets no backends"
                ),
            }
        }
    }
    watchers
}

/// The runtime the watch tasks run on: one worker thread, created on first use. Creating it
/// fails only when the OS refuses a thread; that is reported, and retried on the next call.
fn runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static CREATING: Mutex<()> = Mutex::new(());
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    // One creator at a time, so no second runtime is ever built and dropped (dropping one
    // inside another runtime's context panics).
    let _creating = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-discovery")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| runtime))
}
