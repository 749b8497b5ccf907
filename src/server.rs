//! Process lifecycle: the pingora `Server` that hosts the listeners and the admin endpoint,
//! signals (SIGTERM/SIGINT drain, SIGHUP reload, SIGQUIT upgrade), and readiness.
//!
//! pingora's own SIGTERM path waits a fixed grace period whatever is in flight. sluice instead
//! drains: it sends GOAWAY on every connection, waits until the last one closes or
//! `shutdown.drain_timeout` passes, and only then lets pingora stop its runtimes.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig as PingoraListener};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::balance::Cluster;
use crate::config::{ClusterConfig, Config};
use crate::discovery::{self, Watchers};
use crate::metrics::metrics;
use crate::proxy::{H2Settings, Proxy, Router};

/// Everything a boxed cold-path error needs (config, CLI, start-up).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === Lifecycle ===

/// Process-wide state every listener and the admin endpoint share: draining, open connection
/// count, readiness.
#[derive(Debug)]
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    connections: AtomicUsize,
    all_closed: Notify,
    listeners_bound: AtomicBool,
}

impl Lifecycle {
    pub fn new() -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            draining: watch::Sender::new(false),
            connections: AtomicUsize::new(0),
            all_closed: Notify::new(),
            listeners_bound: AtomicBool::new(false),
        })
    }

    /// Flips to true once, when draining starts.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    pub fn listeners_bound(&self) -> bool {
        self.listeners_bound.load(Ordering::Acquire)
    }

    /// Counts one downstream connection until the guard drops.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::AcqRel);
        OpenConnection(Arc::clone(self))
    }

    /// Starts draining and waits until every downstream connection closed, or `timeout`.
    /// Returns the number still open.
    async fn drain(&self, timeout: Duration) -> usize {
        self.draining.send_replace(true);
        let all_closed = async {
            loop {
                let notified = self.all_closed.notified();
                if self.connections.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, all_closed).await;
        self.connections.load(Ordering::Acquire)
    }
}

/// One open downstream connection.
#[derive(Debug)]
pub struct OpenConnection(Arc<Lifecycle>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

// === start-up ===

/// Builds the clusters and router for a config and starts their discovery. Same-named
/// clusters of `previous` hand over their backends (and live connections) when the discovery
/// source is unchanged. The returned [`Watchers`] keep the etcd watches running.
fn build_router(config: &Config, previous: Option<&Router>) -> (Router, Watchers) {
    let clusters: Vec<(Arc<Cluster>, &ClusterConfig)> = config
        .clusters
        .iter()
        .map(|c| {
            let old = previous.and_then(|r| r.cluster(&c.name));
            // Counters carry on under the same name, whatever else changed.
            let cluster = Arc::new(match old {
                Some(old) => Cluster::with_stats(c, Arc::clone(&old.stats)),
                None => Cluster::new(c),
            });
            if let Some(old) = old {
                // A changed source starts from nothing: adopted backends would keep the old
                // source's name, and an etcd set is not the new prefix's.
                if old.discovery.source == cluster.discovery.source
                    && old.discovery.prefix == cluster.discovery.prefix
                {
                    cluster.adopt_backends(old);
                }
            }
            (cluster, c)
        })
        .collect();
    let watchers = discovery::start(&clusters, config.etcd.as_ref());
    let router = Router::new(config, clusters.into_iter().map(|(c, _)| c).collect());
    (router, watchers)
}

/// How the process starts.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The file to re-read on SIGHUP (`None` in demo mode).
    pub config_path: Option<PathBuf>,
    /// Take the listening sockets over from a running sluice (which gets SIGQUIT) instead of
    /// binding them.
    pub upgrade: bool,
}

/// Runs the proxy until a shutdown signal; returns once it has drained.
pub fn run(config: Config, options: RunOptions) -> Result<(), BoxError> {
    // pingora panics in a service thread when a listener cannot bind; check first, so the
    // operator gets one clear error and exit 1 instead. An upgrade inherits bound sockets.
    if !options.upgrade {
        for listener in &config.listeners {
            check_bindable(listener.address.0, &format!("listener {:?}", listener.name))?;
        }
        if let Some(admin) = &config.admin {
            check_bindable(admin.address.0, "admin")?;
        }
    }

    let lifecycle = Lifecycle::new();
    let (router, watchers) = build_router(&config, None);
    let router = Arc::new(ArcSwap::from_pointee(router));
    let drain_timeout = config.shutdown.drain_timeout.0;

    let conf = ServerConf {
        threads: config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        // SIGTERM drains before pingora is told to stop (see SignalWatch), and then asks for a
        // fast stop, which skips this. During an upgrade (SIGQUIT) pingora's grace period is
        // what lets the old process finish its streams.
        grace_period_seconds: Some(drain_timeout.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: config.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let h2 = H2Settings::default();
    let access_log = match config.access_log.as_ref().filter(|a| a.enabled) {
        Some(log) => Some(AccessLog::start(log).map_err(|e| {
            format!(
                "access_log: cannot open {}: {e}",
                log.path.as_deref().unwrap_or("stdout")
            )
        })?),
        None => None,
    };
    let mut listen_addrs = Vec::new();
    for listener in &config.listeners {
        let proxy = Proxy {
            listener: listener.name.clone(),
            router: Arc::clone(&router),
            lifecycle: Arc::clone(&lifecycle),
            h2,
            access_log: access_log.clone(),
            connections_gauge: metrics().downstream_connections(&listener.name),
        };
        let mut service = Service::new(format!("listener {}", listener.name), proxy);
        // pingora buffers L4 reads and writes by default; h2 does its own, and the extra copy
        // cost ~10% on 64 KiB messages in the prototype (design.md).
        service.add_listener(
            PingoraListener::tcp(listener.address.0.to_string())
                .l4_buffer(L4BufferSettings::unbuffered()),
        );
        server.add_service(service);
        listen_addrs.push(listener.address.0);
        info!(listener = %listener.name, address = %listener.address.0, "listening");
    }
    if let Some(admin) = &config.admin {
        let app = Admin {
            router: Arc::clone(&router),
            lifecycle: Arc::clone(&lifecycle),
        };
        let mut service = Service::new("admin".to_string(), app);
        // Off the call path: one thread is plenty.
        service.threads = Some(1);
        service.add_tcp(&admin.address.0.to_string());
        server.add_service(service);
        info!(address = %admin.address.0, "admin endpoint");
    }
    server.add_service(background_service(
        "readiness",
        Readiness {
            addresses: listen_addrs,
            lifecycle: Arc::clone(&lifecycle),
        },
    ));
    server.add_service(background_service(
        "rates",
        RateSampler {
            router: Arc::clone(&router),
        },
    ));
    server.add_service(background_service(
        "reload",
        Reload {
            path: options.config_path,
            router: Arc::clone(&router),
            watchers: std::sync::Mutex::new(watchers),
            restart_only: RestartOnly::of(&config),
        },
    ));

    server.run(RunArgs {
        shutdown_signal: Box::new(SignalWatch {
            lifecycle,
            drain_timeout,
        }),
    });
    info!("stopped");
    Ok(())
}

fn check_bindable(address: SocketAddr, what: &str) -> Result<(), BoxError> {
    TcpListener::bind(address)
        .map(drop)
        .map_err(|e| format!("{what}: cannot listen on {address}: {e}").into())
}

// === signals ===

/// Turns SIGTERM and SIGINT into a drain, and SIGQUIT into pingora's graceful upgrade.
struct SignalWatch {
    lifecycle: Arc<Lifecycle>,
    drain_timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for SignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int, mut quit) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(term), Ok(int), Ok(quit)) => (term, int, quit),
            _ => {
                error!("cannot install signal handlers; shutting down");
                return ShutdownSignal::FastShutdown;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {
                // pingora sends the sockets, waits 5 s for the new process to take them, then
                // flips its shutdown watch: our connections send GOAWAY and get its grace
                // period (drain_timeout) to finish.
                info!("SIGQUIT: handing the listening sockets to the new process");
                return ShutdownSignal::GracefulUpgrade;
            }
        }
        info!(timeout = ?self.drain_timeout, "draining: GOAWAY sent, waiting for in-flight streams");
        // A second SIGTERM or SIGINT cuts the drain short.
        let left = tokio::select! {
            left = self.lifecycle.drain(self.drain_timeout) => left,
            _ = term.recv() => usize::MAX,
            _ = int.recv() => usize::MAX,
        };
        match left {
            0 => info!("drained: all connections closed"),
            usize::MAX => warn!("second signal: stopping without waiting"),
            n => warn!(
                connections = n,
                "drain timeout passed; closing what is left"
            ),
        }
        ShutdownSignal::FastShutdown
    }
}

// === background services ===

/// Marks the listeners bound once each accepts a TCP connection (pingora does not report it).
struct Readiness {
    addresses: Vec<SocketAddr>,
    lifecycle: Arc<Lifecycle>,
}

#[async_trait]
impl BackgroundService for Readiness {
    async fn start(&self, _shutdown: ShutdownWatch) {
        for address in &self.addresses {
            let target = if address.ip().is_unspecified() {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
            } else {
                *address
            };
            // Bounded: 30 s in 10 ms steps.
            let mut bound = false;
            for _ in 0..3000 {
                if tokio::net::TcpStream::connect(target).await.is_ok() {
                    bound = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !bound {
                error!(%address, "listener never accepted a connection; /readyz stays 503");
                return;
            }
        }
        self.lifecycle
            .listeners_bound
            .store(true, Ordering::Release);
    }
}

/// Samples every backend's counters each second, for the recent rates `/backends` and the
/// status page show.
struct RateSampler {
    router: Arc<ArcSwap<Router>>,
}

#[async_trait]
impl BackgroundService for RateSampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    for cluster in self.router.load().clusters() {
                        for backend in &cluster.backends().backends {
                            backend.sample_rates();
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// SIGHUP: re-read the config file and swap in its clusters and routes. Established
/// connections and in-flight streams are untouched; an invalid file is logged and ignored.
struct Reload {
    path: Option<PathBuf>,
    router: Arc<ArcSwap<Router>>,
    /// The etcd watches feeding the current router's clusters.
    watchers: std::sync::Mutex<Watchers>,
    restart_only: RestartOnly,
}

/// The settings a reload cannot change: they are read once, at start.
#[derive(Debug, PartialEq)]
struct RestartOnly {
    listeners: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    threads: Option<usize>,
    drain_timeout: Duration,
    log_level: Option<String>,
    upgrade_sock: String,
    access_log: Option<crate::config::AccessLogConfig>,
}

impl RestartOnly {
    fn of(config: &Config) -> RestartOnly {
        RestartOnly {
            listeners: config
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.address.0))
                .collect(),
            admin: config.admin.as_ref().map(|a| a.address.0),
            threads: config.threads,
            drain_timeout: config.shutdown.drain_timeout.0,
            log_level: config.log.level.clone(),
            upgrade_sock: config.upgrade_sock.clone(),
            access_log: config.access_log.clone(),
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
                _ = hangup.recv() => self.reload(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Reload {
    fn reload(&self) {
        let Some(path) = &self.path else {
            warn!("SIGHUP: this process has no config file to reload (demo mode)");
            return;
        };
        let config = match Config::load(path) {
            Ok(config) => config,
            Err(error) => {
                error!(%error, "SIGHUP: config rejected; the running config stays");
                return;
            }
        };
        if RestartOnly::of(&config) != self.restart_only {
            warn!(
                "SIGHUP: changes to listeners, admin, threads, shutdown, log, access_log or \
                 upgrade_sock need a restart (or an upgrade); they are ignored"
            );
        }
        let previous = self.router.load_full();
        let (next, watchers) = build_router(&config, Some(&previous));
        self.router.store(Arc::new(next));
        // The new watches run; the old ones stop (their clusters are no longer routed to).
        *self.watchers.lock().unwrap_or_else(|e| e.into_inner()) = watchers;

        info!(path = %path.display(), "SIGHUP: config reloaded");
    }
}
