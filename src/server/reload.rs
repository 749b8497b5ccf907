//! SIGHUP: re-read the listeners' TLS files and the config file, and swap in its clusters and
//! routes. Established connections and in-flight streams are untouched; an invalid file is
//! logged and ignored.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use super::certificates::Certificates;
use super::{build_generation, check_files, Feeds};
use crate::balance::Clusters;
use crate::config::values::{NonEmpty, ThreadCount};
use crate::config::{
    AccessLogConfig, AdminConfig, Config, FleetConfig, ListenerConfig, LogConfig, OverridesConfig,
    RequestIdConfig, ShutdownConfig, TracingConfig,
};
use crate::proxy::Router;
use crate::steering::Steering;
use crate::sync::lock;

pub(super) struct Reload {
    /// The listeners' certificates, re-read on each SIGHUP.
    pub(super) certificates: Arc<Certificates>,
    /// The file to re-read (`None` in demo mode).
    pub(super) path: Option<PathBuf>,
    /// The live clusters, and the routes to them: swapped together.
    pub(super) clusters: Arc<ArcSwap<Clusters>>,
    pub(super) router: Arc<ArcSwap<Router>>,
    /// The operator's overrides: the new generation is built with them, and they are applied
    /// once more after the swap (a change made meanwhile reached only the old one).
    pub(super) steering: Arc<Steering>,
    /// The etcd watches and health checkers of the current clusters; replaced on each
    /// reload.
    pub(super) feeds: Mutex<Feeds>,
    pub(super) restart_only: RestartOnly,
    /// The runtime the discovery watches run on.
    pub(super) discovery: Handle,
}

/// The settings a reload cannot change, read once at start: every top-level key but
/// `clusters`, `routes`, `etcd` and `client_key`, whole, as the config types serialise them.
/// A key added inside any of them is restart-only without being listed here, and a new
/// top-level key does not compile until `RestartOnly::of` sorts it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RestartOnly {
    /// The listeners' addresses, and the admin's: the bound ones for the running process
    /// (which differ from the config's where it asked for port 0).
    listeners: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    /// All the rest of those keys, addresses left out.
    rest: serde_json::Value,
}

/// The restart-only keys, for `RestartOnly::rest`.
#[derive(Serialize)]
struct RestartOnlyKeys<'a> {
    listeners: &'a NonEmpty<ListenerConfig>,
    admin: &'a Option<AdminConfig>,
    log: &'a LogConfig,
    shutdown: &'a ShutdownConfig,
    threads: &'a Option<ThreadCount>,
    access_log: &'a Option<AccessLogConfig>,
    request_id: &'a RequestIdConfig,
    upgrade_sock: &'a String,
    overrides: &'a Option<OverridesConfig>,
    fleet: &'a Option<FleetConfig>,
    tracing: Option<&'a TracingConfig>,
}

impl RestartOnly {
    /// The running process's settings: the config it started with, with the addresses it
    /// actually bound.
    pub(super) fn running(
        config: &Config,
        listeners: &[SocketAddr],
        admin: Option<SocketAddr>,
    ) -> RestartOnly {
        let mut settings = RestartOnly::of(config);
        for (configured, bound) in settings.listeners.iter_mut().zip(listeners) {
            *configured = *bound;
        }
        settings.admin = admin.or(settings.admin);
        settings
    }

    /// Whether `next` (a new file) changes none of these settings. A new file that asks for
    /// port 0 again keeps the port already bound.
    pub(super) fn unchanged_by(&self, next: &RestartOnly) -> bool {
        let keep_bound = |asked: &mut SocketAddr, running: &SocketAddr| {
            if asked.port() == 0 && asked.ip() == running.ip() {
                *asked = *running;
            }
        };
        let mut next = next.clone();
        for (asked, running) in next.listeners.iter_mut().zip(&self.listeners) {
            keep_bound(asked, running);
        }
        if let (Some(asked), Some(running)) = (next.admin.as_mut(), &self.admin) {
            keep_bound(asked, running);
        }
        *self == next
    }

    fn of(config: &Config) -> RestartOnly {
        // Every top-level key by name, no `..`: a new one must be sorted here to compile.
        let Config {
            listeners,
            admin,
            log,
            shutdown,
            threads,
            access_log,
            request_id,
            upgrade_sock,
            overrides,
            fleet,
            tracing,
            // Reloadable.
            clusters: _,
            routes: _,
            etcd: _,
            client_key: _,
            // Derived from the others.
            files: _,
            expansions: _,
            source_hash: _,
        } = config;
        let keys = RestartOnlyKeys {
            listeners,
            admin,
            log,
            shutdown,
            threads,
            access_log,
            request_id,
            upgrade_sock,
            overrides,
            fleet,
            tracing: tracing.as_ref().map(|t| &t.value),
        };
        // Plain data of our own types: serialising cannot fail.
        let mut rest = serde_json::to_value(&keys).unwrap_or_default();
        // The addresses are compared apart (port 0 keeps the bound port).
        if let Some(list) = rest["listeners"].as_array_mut() {
            list.iter_mut()
                .for_each(|l| l["address"] = serde_json::Value::Null);
        }
        if rest["admin"].is_object() {
            rest["admin"]["address"] = serde_json::Value::Null;
        }
        RestartOnly {
            listeners: listeners.0.iter().map(|l| l.address.0).collect(),
            admin: admin.as_ref().map(|a| a.address.0),
            rest,
        }
    }
}

#[async_trait]
impl BackgroundService for Reload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(error) => {
                error!(%error, "cannot install the SIGHUP handler; reload is off");
                return;
            }
        };
        loop {
            tokio::select! {
                // Ends the loop only when the process shuts down.
                _ = hangup.recv() => self.reload().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Reload {
    async fn reload(&self) {
        // Certificates first: they are reloaded even when the config file is not.
        let certificates = Arc::clone(&self.certificates);
        let _ = tokio::task::spawn_blocking(move || certificates.reload_changed("SIGHUP")).await;
        let Some(path) = self.path.clone() else {
            warn!("SIGHUP: this process has no config file to reload (demo mode)");
            return;
        };
        // Reading the file and the PEM files it names is blocking I/O: off the runtime.
        let loaded = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            check_files(&config, &path.display().to_string())?;
            Ok::<_, crate::BoxError>((config, path))
        })
        .await;
        let (config, path) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(error)) => {
                error!(%error, "SIGHUP: config rejected; the running config stays");
                return;
            }
            Err(error) => {
                error!(%error, "SIGHUP: reading the config failed; the running config stays");
                return;
            }
        };
        if !self.restart_only.unchanged_by(&RestartOnly::of(&config)) {
            warn!(
                "SIGHUP: changes to listeners (their TLS files' names included), admin, \
                 threads, shutdown, log, access_log, request_id, upgrade_sock, overrides, tracing or \
                 fleet need a restart (or an upgrade); they are ignored"
            );
        }
        let previous = self.clusters.load_full();
        let steering = (&self.steering.overrides, &self.steering.instances);
        let next = match build_generation(&config, Some(&previous), &self.discovery, steering) {
            Ok(built) => built,
            Err(error) => {
                error!(%error, "SIGHUP: config rejected; the running config stays");
                return;
            }
        };
        self.certificates.watch_clusters(&config, &next.clusters);
        // The clusters first: a call routed by the new table finds its cluster in `/backends`.
        self.clusters.store(Arc::new(next.clusters));
        self.router.store(Arc::new(next.router));
        self.steering.apply();
        (self.steering.config_hash).store(config.source_hash, std::sync::atomic::Ordering::Relaxed);
        // The new watches and checkers run; the old ones stop (their clusters are no longer
        // routed to).
        *lock(&self.feeds) = next.feeds;
        info!(path = %path.display(), "SIGHUP: config reloaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, level: &str) -> Config {
        let yaml = format!(
            "listeners: [{{name: grpc, address: \"{listen}\"}}]\nlog: {{level: {level}}}\nclusters: [{{name: c, discovery: {{static: [\"a:1\"]}}}}]\n"
        );
        Config::parse(&yaml, "t").unwrap()
    }

    fn settings(listen: &str, level: &str) -> RestartOnly {
        RestartOnly::of(&config(listen, level))
    }

    #[test]
    fn port_zero_again_keeps_the_bound_port_and_other_changes_count() {
        let bound: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        let running = RestartOnly::running(&config("127.0.0.1:0", "info"), &[bound], None);
        assert!(running.unchanged_by(&settings("127.0.0.1:0", "info")));
        assert!(running.unchanged_by(&settings("127.0.0.1:41234", "info")));
        assert!(!running.unchanged_by(&settings("127.0.0.1:41235", "info")));
        assert!(!running.unchanged_by(&settings("127.0.0.1:0", "debug")));
    }

    #[test]
    fn any_listener_key_is_restart_only_and_reloadable_keys_are_not() {
        let with = |extra: &str| {
            let yaml = format!(
                "listeners: [{{name: grpc, address: \"127.0.0.1:1\"{extra}}}]\nclusters: [{{name: c, discovery: {{static: [\"a:1\"]}}}}]\n"
            );
            RestartOnly::of(&Config::parse(&yaml, "t").unwrap())
        };
        let base = with("");
        assert!(!base.unchanged_by(&with(", max_header_list_size: 1024")));
        assert!(!base.unchanged_by(&with(", keepalive: {min_ping_interval: 1s}")));
        assert!(
            base.unchanged_by(&with(", max_concurrent_streams: 10000")),
            "the default, written out"
        );
        let reloaded = RestartOnly::of(&Config::parse(
            "listeners: [{name: grpc, address: \"127.0.0.1:1\"}]\nclusters: [{name: c, balancer: round_robin, discovery: {static: [\"b:1\"]}}]\n",
            "t",
        ).unwrap());
        assert!(base.unchanged_by(&reloaded));
    }
}
