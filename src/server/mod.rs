//! The wiring: the pingora `Server` that hosts the listeners and the admin endpoint, the
//! discovery runtime, signals (SIGTERM/SIGINT drain, SIGHUP reload, SIGQUIT upgrade), and
//! readiness.
//!
//! pingora's own SIGTERM and upgrade paths wait a fixed grace period whatever is in flight.
//! sluice instead drains: it sends GOAWAY on every connection, waits until the last one closes
//! or `shutdown.drain_timeout` passes, and only then stops (signals.rs).

mod background;
mod certificates;
mod listen;
mod reload;
mod signals;
pub mod takeover;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use tokio::runtime::Handle;
use tracing::info;

use crate::admin::Admin;
use crate::balance::{Cluster, Clusters};
use crate::certs;
use crate::config::{ClientKeyConfig, ClusterConfig, Config};
use crate::discovery::{self, Watchers};
use crate::health;
use crate::lifecycle::Lifecycle;
use crate::overrides::Overrides;
use crate::proxy::web::Cors;
use crate::proxy::{ConnectionPolicy, Proxy, Router};
use crate::steering::fleet::{self, Fleet};
use crate::steering::Steering;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::trace::Tracer;
use crate::telemetry::{metrics, ClusterCertificate};
use crate::transport::tls::ClientTls;
use crate::transport::H2Settings;
use crate::BoxError;
use background::{RateSampler, Readiness};
use certificates::{CertificateWatch, Certificates};
use listen::{BufferL4, Listening};
use reload::{Reload, RestartOnly};
use signals::{SignalWatch, UpgradeExit};

/// How the process starts.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The file to re-read on SIGHUP (`None` in demo mode).
    pub config_path: Option<PathBuf>,
    /// Take the listening sockets over from a running sluice (which gets SIGQUIT) instead of
    /// binding them.
    pub upgrade: bool,
}

/// The checks on a loaded config that need the layers above config: that the etcd TLS files
/// make a TLS setup, and that each cluster's upstream TLS builds (its CA, or the system's
/// roots). `sluice check`, start-up and reload run it; `origin` names the file in errors.
pub fn check_files(config: &Config, origin: &str) -> Result<(), BoxError> {
    for i in 0..config.clusters.len() {
        upstream_tls(config, i).map_err(|e| format!("{origin}: {e}"))?;
    }
    let Some(tls) = config.etcd.as_ref().and_then(|e| e.tls.as_ref()) else {
        return Ok(());
    };
    let Some(files) = &config.files.etcd_tls else {
        return Err(format!(
            "{origin}: etcd.tls: the files were not read (load the config with Config::load)"
        )
        .into());
    };
    discovery::etcd::tls_options(files).map_err(|error| {
        let at = tls.cert_file.as_ref().unwrap_or(&tls.ca_file).referenced;
        let (line, column) = (at.line(), at.column());
        format!("{origin}: etcd.tls: {error} at line {line} column {column}")
    })?;
    Ok(())
}

/// What keeps a config generation's background work running: the etcd watches and the
/// health checkers. Dropping it stops them (on reload, after the next generation started).
#[derive(Debug)]
struct Feeds {
    _watchers: Watchers,
    _checkers: health::Checkers,
}

/// A cluster's upstream TLS, with its client certificate's leaf (for the expiry metric).
type BuiltClientTls = (Arc<ClientTls>, Option<certs::Described>);

/// Cluster `i`'s upstream TLS, built from the files the config load read (`None`: cleartext).
fn upstream_tls(config: &Config, i: usize) -> Result<Option<BuiltClientTls>, BoxError> {
    let cluster = &config.clusters[i];
    let Some(tls) = &cluster.tls else {
        return Ok(None);
    };
    let name = &cluster.name.value;
    let Some(Some(files)) = config.files.cluster_tls.get(i) else {
        return Err(format!("clusters[{i}].tls ({name}): the files were not read").into());
    };
    let pem = certificates::cluster_pem(files, tls.server_name.as_ref().map(|n| n.0.as_str()));
    let (client, leaf) =
        ClientTls::new(&pem).map_err(|e| format!("clusters[{i}].tls ({name}): {e}"))?;
    Ok(Some((Arc::new(client), leaf)))
}

/// One config's clusters, the routes to them, and what feeds them.
struct Generation {
    clusters: Clusters,
    router: Router,
    feeds: Feeds,
}

/// Builds the clusters and router for a config and starts their discovery and health checks
/// on `runtime`. Same-named clusters of `previous` keep their counters and queue, and hand
/// over their backends (and live connections) when the discovery source is unchanged.
fn build_generation(
    config: &Config,
    previous: Option<&Clusters>,
    runtime: &Handle,
    steering: (&Arc<Overrides>, &Arc<AtomicUsize>),
) -> Result<Generation, BoxError> {
    let (overrides, instances) = steering;
    // Everything that can fail comes first: a cluster built from `previous` takes over its
    // queue and limits at once, which a rejected config must not have touched.
    let mut tls_of = Vec::with_capacity(config.clusters.len());
    for i in 0..config.clusters.len() {
        tls_of.push(upstream_tls(config, i)?);
    }
    let mut clusters: Vec<(Arc<Cluster>, &ClusterConfig)> = Vec::new();
    let mut certificates = Vec::new();
    for (c, tls) in config.clusters.iter().zip(tls_of) {
        let tls = tls.map(|(client, leaf)| {
            let cert = c.tls.as_ref().and_then(|t| t.cert_file.as_ref());
            if let (Some(leaf), Some(cert)) = (leaf, cert) {
                certificates.push(ClusterCertificate {
                    cluster: c.name.value.clone(),
                    file: cert.value.clone(),
                    expires_at: leaf.not_after,
                });
            }
            client
        });
        clusters.push(new_cluster(c, tls, &config.client_key, previous, overrides));
    }
    metrics().set_cluster_certificates(&certificates);
    let feeds = Feeds {
        _watchers: discovery::start(&clusters, config, runtime),
        _checkers: health::start(&clusters, runtime),
    };
    let clusters = Clusters::new(clusters.into_iter().map(|(c, _)| c).collect());
    let router = Router::new(config, &clusters, &overrides.current(), instances);
    Ok(Generation {
        clusters,
        router,
        feeds,
    })
}

/// One cluster of a new generation: the next generation of the same-named cluster of
/// `previous` if there is one.
fn new_cluster<'c>(
    c: &'c ClusterConfig,
    tls: Option<Arc<ClientTls>>,
    client_key: &ClientKeyConfig,
    previous: Option<&Clusters>,
    overrides: &Arc<Overrides>,
) -> (Arc<Cluster>, &'c ClusterConfig) {
    let old = previous.and_then(|p| p.by_name(&c.name.value));
    let cluster = Arc::new(match old {
        Some(old) => Cluster::after(c, tls, client_key, old),
        None => Cluster::new(c, tls, client_key, Arc::clone(overrides)),
    });
    // A changed source starts from nothing: an etcd set is not the new prefix's.
    if let Some(old) = old.filter(|old| old.source.same_source(&cluster.source)) {
        cluster.adopt_backends(old);
        if old.settings.upstream.tls != cluster.settings.upstream.tls {
            // Connections made under the old TLS setup serve no new call.
            for backend in &cluster.backends().backends {
                backend.transport.retire_connections();
            }
        }
        if c.health_check.is_none() {
            // Checks turned off: what they said no longer holds.
            for backend in &cluster.backends().backends {
                backend.clear_health_checks();
            }
        }
    }
    (cluster, c)
}

/// The runtime the discovery watches run on: one worker thread, off the data plane's.
fn discovery_runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-discovery")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the discovery runtime: {e}").into())
}

/// What every listener and the admin endpoint share.
struct Shared {
    clusters: Arc<ArcSwap<Clusters>>,
    router: Arc<ArcSwap<Router>>,
    lifecycle: Arc<Lifecycle>,
    access_log: Option<AccessLog>,
    /// Spans to the OTLP collector (`tracing`).
    tracer: Option<Arc<Tracer>>,
    steering: Arc<Steering>,
}

/// The overrides and what they apply to; with `overrides.etcd_prefix`, shared through etcd.
fn steering(
    config: &Config,
    clusters: &Arc<ArcSwap<Clusters>>,
    router: &Arc<ArcSwap<Router>>,
    overrides: Arc<Overrides>,
    instances: Arc<AtomicUsize>,
) -> Arc<Steering> {
    let mut steering = Steering::new(Arc::clone(clusters), Arc::clone(router));
    steering.overrides = overrides;
    steering.instances = instances;
    steering.config_hash = config.source_hash.into();
    if let (Some(shared), Some(etcd)) = (&config.overrides, &config.etcd) {
        let client = discovery::etcd::ClientConfig::new(etcd, config.files.etcd_tls.as_ref());
        steering = steering.with_store(fleet::Store::new(client, &shared.etcd_prefix.0));
    }
    Arc::new(steering)
}

/// The fleet member's background work, when the config shares overrides or registers.
fn fleet_service(
    config: &Config,
    steering: &Arc<Steering>,
    admin: Option<SocketAddr>,
) -> Option<Fleet> {
    let etcd = config.etcd.as_ref()?;
    if config.overrides.is_none() && config.fleet.is_none() {
        return None;
    }
    let registry = config.fleet.as_ref().map(|f| {
        let host = fleet::hostname();
        let id = f.instance_id.clone().unwrap_or_else(|| match admin {
            Some(admin) => format!("{host}:{}", admin.port()),
            None => format!("{host}:pid{}", std::process::id()),
        });
        let me = fleet::Registration {
            id,
            admin: admin.map(|a| a.to_string()),
            // Written from `Steering::config_hash`, which a reload updates.
            config_hash: String::new(),
            override_revision: 0,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
        };
        (f.etcd_prefix.0.clone(), me)
    });
    Some(Fleet {
        steering: Arc::clone(steering),
        etcd: discovery::etcd::ClientConfig::new(etcd, config.files.etcd_tls.as_ref()),
        overrides_prefix: config.overrides.as_ref().map(|o| o.etcd_prefix.0.clone()),
        registry,
    })
}

/// Runs the proxy until a shutdown signal; returns once it has drained.
pub fn run(config: Config, options: RunOptions) -> Result<(), BoxError> {
    let origin = options
        .config_path
        .as_ref()
        .map_or("config".to_string(), |p| p.display().to_string());
    check_files(&config, &origin)?;
    if options.upgrade {
        refuse_port_zero(&config, &origin)?;
    }
    let (certificates, listener_tls) = Certificates::build(&config)?;
    let certificates = Arc::new(certificates);
    let discovery = discovery_runtime()?;
    let (overrides, instances) = (Overrides::new(), Arc::new(AtomicUsize::new(1)));
    let generation = build_generation(&config, None, discovery.handle(), (&overrides, &instances))?;
    certificates.watch_clusters(&config, &generation.clusters);
    let clusters = Arc::new(ArcSwap::from_pointee(generation.clusters));
    let router = Arc::new(ArcSwap::from_pointee(generation.router));
    let steering = steering(&config, &clusters, &router, overrides, instances);
    let shared = Shared {
        clusters,
        router,
        lifecycle: Lifecycle::new(),
        access_log: start_access_log(&config)?,
        tracer: start_tracer(&config)?,
        steering,
    };
    let mut server = pingora_server(&config, options.upgrade);
    let listeners = add_listeners(&mut server, &config, &shared, listener_tls, options.upgrade)?;
    let admin = add_admin(&mut server, &config, &shared, options.upgrade)?;
    let restart_only = RestartOnly::running(&config, &listeners, admin);
    if let Some(fleet) = fleet_service(&config, &shared.steering, admin) {
        server.add_service(background_service("fleet", fleet));
    }
    server.add_service(background_service(
        "readiness",
        Readiness {
            addresses: listeners,
            lifecycle: Arc::clone(&shared.lifecycle),
        },
    ));
    server.add_service(background_service(
        "upgrade exit",
        UpgradeExit {
            lifecycle: Arc::clone(&shared.lifecycle),
            drain_timeout: config.shutdown.drain_timeout.0,
            access_log: shared.access_log.clone(),
        },
    ));
    server.add_service(background_service(
        "rates",
        RateSampler {
            clusters: Arc::clone(&shared.clusters),
        },
    ));
    server.add_service(background_service(
        "certificates",
        CertificateWatch {
            certificates: Arc::clone(&certificates),
        },
    ));
    server.add_service(background_service(
        "reload",
        Reload {
            certificates,
            path: options.config_path,
            clusters: Arc::clone(&shared.clusters),
            router: Arc::clone(&shared.router),
            steering: Arc::clone(&shared.steering),
            feeds: Mutex::new(generation.feeds),
            restart_only,
            discovery: discovery.handle().clone(),
        },
    ));
    server.run(RunArgs {
        shutdown_signal: Box::new(SignalWatch {
            lifecycle: shared.lifecycle,
            drain_timeout: config.shutdown.drain_timeout.0,
        }),
    });
    info!("stopped");
    // Whatever discovery still runs (a watch, an etcd client's DNS lookup) gets a moment to
    // end, not a say over when the process exits.
    discovery.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// An upgrade takes the old process's sockets over by address, so it cannot work out which
/// socket a port-0 listener was.
fn refuse_port_zero(config: &Config, origin: &str) -> Result<(), BoxError> {
    let listeners = config
        .listeners
        .iter()
        .map(|l| (&l.name.value, l.address.0));
    let admin_name = "admin".to_string();
    let admin = config.admin.iter().map(|a| (&admin_name, a.address.0));
    for (name, address) in listeners.chain(admin) {
        if address.port() == 0 {
            return Err(format!(
                "{origin}: {name}: port 0 cannot be upgraded (sockets are handed over by address); give it a fixed port"
            )
            .into());
        }
    }
    Ok(())
}

/// The pingora server, bootstrapped (in an upgrade, that takes the old process's sockets).
fn pingora_server(config: &Config, upgrade: bool) -> Server {
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(config));
    takeover::bootstrap(&mut server, upgrade, &config.upgrade_sock);
    server
}

/// pingora's sleep after an upgrade's GOAWAY: longer than `drain_timeout` (rounded up) plus
/// the access log's last lines, so `UpgradeExit`, whose drain starts a moment later, always
/// decides when the process ends and says why.
fn upgrade_grace(drain_timeout: Duration) -> u64 {
    let whole_seconds = drain_timeout.as_secs() + u64::from(drain_timeout.subsec_nanos() > 0);
    whole_seconds + signals::LAST_LINES.as_secs() + 1
}

/// pingora's settings for `config`: worker threads, scheduler, drain and upgrade.
fn server_conf(config: &Config) -> ServerConf {
    let threads = config
        .threads
        .map(|t| t.0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ServerConf {
        threads,
        // One thread has nobody to steal from: a current-thread runtime per listener skips the
        // multi-thread scheduler's bookkeeping and its wakeup syscalls (loadtest/RESULTS.md, "CPU
        // per call": 3.4% fewer instructions, about 2 µs less CPU per call). With more threads,
        // stealing lets the calls of one busy client connection spread over every core.
        work_stealing: threads > 1,
        // SIGTERM drains before pingora is told to stop (see SignalWatch), and then asks for a
        // fast stop, which skips this. During an upgrade (SIGQUIT) pingora sleeps this long
        // after its GOAWAY; `UpgradeExit` ends the process as soon as it has drained, so this
        // is only the upper bound.
        grace_period_seconds: Some(upgrade_grace(config.shutdown.drain_timeout.0)),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: config.upgrade_sock.clone(),
        ..ServerConf::default()
    }
}

fn start_access_log(config: &Config) -> Result<Option<AccessLog>, BoxError> {
    let Some(log) = config.access_log.as_ref().filter(|a| a.enabled) else {
        return Ok(None);
    };
    let started = AccessLog::start(log).map_err(|e| {
        let path = log.path.as_deref().unwrap_or("stdout");
        format!("access_log: cannot open {path}: {e}")
    })?;
    Ok(Some(started))
}

/// Starts the OTLP export thread when `tracing` is set (config validation refused it already
/// in a build without the `otlp` feature).
fn start_tracer(config: &Config) -> Result<Option<Arc<Tracer>>, BoxError> {
    #[cfg(feature = "otlp")]
    if let Some(tracing) = &config.tracing {
        let tracer = crate::telemetry::otlp::start(&tracing.value)
            .map_err(|e| format!("tracing: cannot start the OTLP exporter: {e}"))?;
        return Ok(Some(Arc::new(tracer)));
    }
    let _ = config;
    Ok(None)
}

/// Adds a data-plane service per listener; returns the addresses bound, in config order.
fn add_listeners(
    server: &mut Server,
    config: &Config,
    shared: &Shared,
    tls: certificates::ListenerTlsList,
    upgrade: bool,
) -> Result<Vec<SocketAddr>, BoxError> {
    let mut bound_listeners = Vec::new();
    let identity_headers = identity_headers(config);
    for (listener, tls) in config.listeners.iter().zip(tls) {
        let name = &listener.name.value;
        let forward = listener
            .tls
            .as_ref()
            .and_then(|t| t.forward_client_cert.as_ref());
        let proxy = Proxy {
            listener: name.clone(),
            router: Arc::clone(&shared.router),
            lifecycle: Arc::clone(&shared.lifecycle),
            h2: H2Settings {
                max_concurrent_streams: listener.max_concurrent_streams.0,
                max_header_list_size: listener.max_header_list_size.0,
                ..H2Settings::default()
            },
            max_connections: listener.max_connections.map(|n| n.0 as usize),
            open: Default::default(),
            grpc_web: (listener.grpc_web.as_ref())
                .map(|web| Cors::new(web, metrics().grpc_web_origin_refused(name))),
            access_log: shared.access_log.clone(),
            tracer: shared.tracer.clone(),
            generate_request_id: config.request_id.generate,
            connections_gauge: metrics().downstream_connections(name),
            tls,
            forward_client_cert: forward.map(|f| f.header.0.clone()),
            identity_headers: Arc::clone(&identity_headers),
            policy: ConnectionPolicy::of(listener),
        };
        let service_name = format!("listener {name}");
        let what = format!("listener {name:?}");
        let address = listener.address.0;
        let (service, bound) =
            Listening::bind(service_name, proxy, address, upgrade, &what, BufferL4::No)?;
        server.add_service(service);
        bound_listeners.push(bound);
        // The test harness reads the bound address from this line.
        info!(listener = %name, address = %bound, "listening");
    }
    Ok(bound_listeners)
}

/// The headers no client may set on any listener: Envoy's `x-forwarded-client-cert`, and each
/// listener's `forward_client_cert` header.
fn identity_headers(config: &Config) -> Arc<[http::HeaderName]> {
    let mut headers = vec![http::HeaderName::from_static("x-forwarded-client-cert")];
    let configured = (config.listeners.iter())
        .filter_map(|l| l.tls.as_ref()?.forward_client_cert.as_ref())
        .map(|f| f.header.0.clone());
    for header in configured {
        if !headers.contains(&header) {
            headers.push(header);
        }
    }
    headers.into()
}

/// Adds the admin endpoint, when configured; returns the address bound.
fn add_admin(
    server: &mut Server,
    config: &Config,
    shared: &Shared,
    upgrade: bool,
) -> Result<Option<SocketAddr>, BoxError> {
    let Some(admin) = &config.admin else {
        return Ok(None);
    };
    let address = admin.address.0;
    let app = Admin {
        clusters: Arc::clone(&shared.clusters),
        lifecycle: Arc::clone(&shared.lifecycle),
        steering: Arc::clone(&shared.steering),
        token_file: admin.token_file.as_ref().map(|f| PathBuf::from(&f.value)),
        loopback: address.ip().is_loopback(),
    };
    let (mut service, bound) = Listening::bind(
        "admin".into(),
        app,
        address,
        upgrade,
        "admin",
        BufferL4::Yes,
    )?;
    // Off the call path: one thread is plenty.
    service.set_threads(1);
    server.add_service(service);
    info!(address = %bound, "admin endpoint");
    Ok(Some(bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf_for(threads: &str) -> ServerConf {
        let yaml = format!(
            "listeners:\n  - name: grpc\n    address: \"127.0.0.1:0\"\n{threads}\
             clusters:\n  - name: echo\n    discovery:\n      static: [\"127.0.0.1:1\"]\n"
        );
        let config = Config::parse(&yaml, "test.yaml").expect("a valid config");
        server_conf(&config)
    }

    #[test]
    fn one_thread_runs_without_work_stealing_and_more_threads_steal() {
        let one = conf_for("threads: 1\n");
        assert_eq!((one.threads, one.work_stealing), (1, false));
        let two = conf_for("threads: 2\n");
        assert_eq!((two.threads, two.work_stealing), (2, true));
        // Unset: one per CPU this process may use, stealing only when there are several.
        let unset = conf_for("");
        assert_eq!(unset.work_stealing, unset.threads > 1);
    }
}
