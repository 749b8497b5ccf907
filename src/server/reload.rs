//! SIGHUP: re-read the listeners' TLS files and the config file, and swap in its clusters and
//! routes. Established connections and in-flight streams are untouched; an invalid file is
//! logged and ignored.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use super::certificates::Certificates;
use super::{build_router, check_files, Feeds};
use crate::config::{AccessLogConfig, Config, DownstreamKeepalive, RequestIdConfig};
use crate::proxy::Router;
use crate::sync::lock;

pub(super) struct Reload {
    /// The listeners' certificates, re-read on each SIGHUP.
    pub(super) certificates: Arc<Certificates>,
    /// The file to re-read (`None` in demo mode).
    pub(super) path: Option<PathBuf>,
    pub(super) router: Arc<ArcSwap<Router>>,
    /// The etcd watches and health checkers of the current router's clusters; replaced on
    /// each reload.
    pub(super) feeds: Mutex<Feeds>,
    pub(super) restart_only: RestartOnly,
    /// The runtime the discovery watches run on.
    pub(super) discovery: Handle,
}

/// The settings a reload cannot change: they are read once, at start.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RestartOnly {
    listeners: Vec<(String, SocketAddr)>,
    /// Each listener's TLS file names and forwarded header (their contents reload).
    listener_tls: Vec<Option<Vec<String>>>,
    /// Each listener's max age, its grace, and keepalive policy.
    listener_policy: Vec<(Option<Duration>, Option<Duration>, DownstreamKeepalive)>,
    /// Each listener's max_connections, max_concurrent_streams and max_header_list_size.
    listener_limits: Vec<(Option<u32>, u32, u32)>,
    admin: Option<SocketAddr>,
    threads: Option<usize>,
    drain_timeout: Duration,
    log_level: Option<String>,
    log_format: crate::config::LogFormat,
    upgrade_sock: String,
    access_log: Option<AccessLogConfig>,
    request_id: RequestIdConfig,
}

impl RestartOnly {
    /// The running process's settings: the config it started with, with the addresses it
    /// actually bound (which differ from the config's where it asked for port 0).
    pub(super) fn running(
        config: &Config,
        listeners: &[SocketAddr],
        admin: Option<SocketAddr>,
    ) -> RestartOnly {
        let mut settings = RestartOnly::of(config);
        for ((_, configured), bound) in settings.listeners.iter_mut().zip(listeners) {
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
        for ((_, asked), (_, running)) in next.listeners.iter_mut().zip(&self.listeners) {
            keep_bound(asked, running);
        }
        if let (Some(asked), Some(running)) = (next.admin.as_mut(), &self.admin) {
            keep_bound(asked, running);
        }
        *self == next
    }

    fn of(config: &Config) -> RestartOnly {
        RestartOnly {
            listeners: config
                .listeners
                .iter()
                .map(|l| (l.name.value.clone(), l.address.0))
                .collect(),
            listener_tls: (config.listeners.iter())
                .map(|l| l.tls.as_ref().map(|t| t.paths()))
                .collect(),
            listener_policy: (config.listeners.iter())
                .map(|l| {
                    let age = l.max_connection_age.map(|d| d.0);
                    (age, l.max_connection_age_grace.map(|d| d.0), l.keepalive)
                })
                .collect(),
            listener_limits: (config.listeners.iter())
                .map(|l| {
                    let max_connections = l.max_connections.map(|n| n.0);
                    (
                        max_connections,
                        l.max_concurrent_streams.0,
                        l.max_header_list_size.0,
                    )
                })
                .collect(),
            admin: config.admin.as_ref().map(|a| a.address.0),
            threads: config.threads.map(|t| t.0),
            drain_timeout: config.shutdown.drain_timeout.0,
            log_level: config.log.level.clone(),
            log_format: config.log.format,
            upgrade_sock: config.upgrade_sock.clone(),
            access_log: config.access_log.clone(),
            request_id: config.request_id,
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
                 threads, shutdown, log, access_log, request_id or upgrade_sock need a restart \
                 (or an upgrade); they are ignored"
            );
        }
        let previous = self.router.load_full();
        let (next, feeds) = match build_router(&config, Some(&previous), &self.discovery) {
            Ok(built) => built,
            Err(error) => {
                error!(%error, "SIGHUP: config rejected; the running config stays");
                return;
            }
        };
        self.certificates.watch_clusters(&config, &next);
        self.router.store(Arc::new(next));
        // The new watches and checkers run; the old ones stop (their clusters are no longer
        // routed to).
        *lock(&self.feeds) = feeds;
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
}
