//! Test harness: real sluice processes, real tonic backends (in-process, or as processes for
//! tests that kill them), and a scripted raw-h2 backend for wire-level checks. Everything
//! listens on 127.0.0.1; every wait is bounded.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod etcd;
pub mod pki;
pub mod raw_h2;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::demo::pb::echo_client::EchoClient;
use sluice::demo::pb::echo_server::EchoServer;
use sluice::demo::{EchoService, EchoStats, WorkerPool, MAX_MESSAGE_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

pub use sluice::demo::pb::EchoRequest;

/// A port for etcd, which cannot report a port it chose itself: taken below the kernel's
/// ephemeral range (32768 and up), so no port-0 bind of another test (sluice, the echo
/// backends) can take it while etcd is stopped and restarted. Two etcd instances of parallel
/// test processes may still draw the same one: it is checked free here, and the etcd harness
/// starts again on new ports when it loses anyway.
pub fn unused_port() -> u16 {
    for _ in 0..100 {
        let port = fastrand::u16(23_000..32_000);
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 23000..32000 after 100 tries");
}

/// Loopback addresses that refuse connections, held for as long as the value lives: each
/// socket is bound but never listens, so no other process can take its port meanwhile.
pub struct RefusedAddrs {
    pub addrs: Vec<SocketAddr>,
    _sockets: Vec<socket2::Socket>,
}

impl RefusedAddrs {
    pub fn new(count: usize) -> RefusedAddrs {
        let mut addrs = Vec::new();
        let mut sockets = Vec::new();
        for _ in 0..count {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("a socket");
            let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
            socket.bind(&any.into()).expect("bind a loopback port");
            let addr = socket.local_addr().unwrap().as_socket().unwrap();
            addrs.push(addr);
            sockets.push(socket);
        }
        RefusedAddrs {
            addrs,
            _sockets: sockets,
        }
    }
}

/// Loopback TCP connections in the ESTABLISHED state with `port` at either end, from
/// /proc/net/tcp: how a test sees that a connection was really closed.
pub fn established_with(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port_of = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && fields[3] == "01"
                && (port_of(fields[1]) == Some(port) || port_of(fields[2]) == Some(port))
        })
        .count()
}

/// Polls the log file at `log` (every 10 ms, at most `budget`) for a line holding `marker`,
/// and returns the `address=` that line reports: how sluice and the echo backends say which
/// port they bound when asked for port 0.
pub async fn address_in_log(log: &Path, marker: &str, budget: Duration) -> Option<SocketAddr> {
    let end = Instant::now() + budget;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text
            .lines()
            .filter(|line| line.contains(marker))
            .find_map(|line| {
                line.split("address=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        if found.is_some() || Instant::now() >= end {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `signal` (`HUP`, `STOP`, ...) to `child`, asserting that `kill` did.
fn send_signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Polls `condition` every 10 ms until it holds or `budget` passes.
pub async fn wait_until(budget: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + budget;
    while Instant::now() < end {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

// === in-process tonic echo backend ===

pub struct Echo {
    pub addr: SocketAddr,
    pub stats: Arc<EchoStats>,
    /// The backend's grpc.health.v1 status of `echo.v1.Echo`.
    health: HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Calls this backend has received.
    pub fn calls(&self) -> u64 {
        self.stats.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn start(id: &str) -> Echo {
        Echo::start_with_delay(id, Duration::ZERO).await
    }

    /// A backend that adds `delay` to every call.
    pub async fn start_with_delay(id: &str, delay: Duration) -> Echo {
        let mut service = EchoService::new(id);
        service.delay = delay;
        Echo::serve(service).await
    }

    /// A backend whose unary calls queue for one of `workers`, then work `work` each; unless
    /// `checks_context`, queued work is done even after the caller has gone.
    pub async fn start_with_workers(
        id: &str,
        workers: usize,
        work: Duration,
        checks_context: bool,
    ) -> Echo {
        let mut service = EchoService::new(id);
        service.pool = Some(WorkerPool::new(workers, work, checks_context));
        Echo::serve(service).await
    }

    /// Work this backend started, and of it, work started after the caller's deadline.
    pub fn work(&self) -> (u64, u64) {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        (
            load(&self.stats.work_started),
            load(&self.stats.work_started_late),
        )
    }

    /// A backend that answers every unary call with `code`, at once.
    pub async fn start_failing(id: &str, code: tonic::Code) -> Echo {
        let mut service = EchoService::new(id);
        service.fail_all = Some(code);
        Echo::serve(service).await
    }

    async fn serve(service: EchoService) -> Echo {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        Echo::serve_with(service, Some(health_service), health).await
    }

    /// Three echo backends, `b1`, `b2`, `b3`, and a sluice in front of them (static cluster
    /// `echo`, defaults).
    pub async fn three_behind_sluice() -> ([Echo; 3], Sluice) {
        Echo::three_behind_sluice_with_threads(DEFAULT_THREADS).await
    }

    /// Like [`Echo::three_behind_sluice`], with a sluice of `threads` worker threads.
    pub async fn three_behind_sluice_with_threads(threads: usize) -> ([Echo; 3], Sluice) {
        let backends = [
            Echo::start("b1").await,
            Echo::start("b2").await,
            Echo::start("b3").await,
        ];
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let sluice = Sluice::start_with_threads(threads, &Sluice::cluster(&addrs, "")).await;
        (backends, sluice)
    }

    /// An echo backend that speaks TLS with this certificate chain and key.
    pub async fn start_tls(id: &str, cert_pem: &str, key_pem: &str) -> Echo {
        Echo::start_tls_with(id, cert_pem, key_pem, None).await
    }

    /// Like [`Echo::start_tls`]; with `client_ca`, it requires a client certificate that CA
    /// signed.
    pub async fn start_tls_with(
        id: &str,
        cert_pem: &str,
        key_pem: &str,
        client_ca: Option<&str>,
    ) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let service = EchoService::new(id);
        let stats = Arc::clone(&service.stats);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        let task = tokio::spawn(async move {
            let serving =
                sluice::demo::serve_echo_with(listener, service, Some(health_service), Some(tls));
            if let Err(error) = serving.await {
                tracing::error!(%error, "TLS echo backend failed");
            }
        });
        Echo {
            addr,
            stats,
            health,
            task,
        }
    }

    /// An echo backend without a grpc.health.v1 service.
    pub async fn start_without_health(id: &str) -> Echo {
        let (health, _) = tonic_health::server::health_reporter();
        let none: Option<HealthServer<tonic_health::server::HealthService>> = None;
        Echo::serve_with(EchoService::new(id), none, health).await
    }

    async fn serve_with(
        service: EchoService,
        health_service: Option<HealthServer<impl Health>>,
        health: HealthReporter,
    ) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let stats = Arc::clone(&service.stats);
        let task = tokio::spawn(async move {
            let serving = sluice::demo::serve_echo_with(listener, service, health_service, None);
            if let Err(error) = serving.await {
                tracing::error!(%error, "echo backend failed");
            }
        });
        Echo {
            addr,
            stats,
            health,
            task,
        }
    }

    /// Sets what the backend's health service says of `echo.v1.Echo`.
    pub async fn set_serving(&self, serving: bool) {
        if serving {
            self.health.set_serving::<EchoServer<EchoService>>().await;
        } else {
            self.health
                .set_not_serving::<EchoServer<EchoService>>()
                .await;
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === echo backend as a process (for SIGKILL) ===

pub struct EchoProcess {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl EchoProcess {
    pub async fn start(id: &str) -> EchoProcess {
        EchoProcess::start_on(id, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Three echo backend processes, `b1`, `b2`, `b3`, and a sluice in front of them (static
    /// cluster `echo` with `extra` keys).
    pub async fn three_behind_sluice(extra: &str) -> ([EchoProcess; 3], Sluice) {
        let backends = [
            EchoProcess::start("b1").await,
            EchoProcess::start("b2").await,
            EchoProcess::start("b3").await,
        ];
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let sluice = Sluice::start(&Sluice::cluster(&addrs, extra)).await;
        (backends, sluice)
    }

    /// An echo backend process listening on `addr` (port 0: one the kernel picks).
    pub async fn start_on(id: &str, addr: SocketAddr) -> EchoProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("echo.log");
        let listen = addr.to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["echo-backend", "--listen", &listen, "--id", id])
            .env("RUST_LOG", "warn,sluice::demo=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("echo log"))
            .spawn()
            .expect("spawn echo-backend");
        let mut process = EchoProcess {
            addr: "127.0.0.1:0".parse().unwrap(),
            child,
            _dir: dir,
        };
        let reported =
            address_in_log(&log, "echo backend listening", Duration::from_secs(20)).await;
        process.addr = reported.unwrap_or_else(|| panic!("echo-backend {id} never listened"));
        let up = wait_for_port(process.addr, Duration::from_secs(20)).await;
        assert!(up, "echo-backend {id} does not accept on {}", process.addr);
        process
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        send_signal(&self.child, signal);
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_for_port(addr: SocketAddr, budget: Duration) -> bool {
    let end = Instant::now() + budget;
    while Instant::now() < end {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

// === sluice as a process ===

/// Worker threads of a sluice the harness starts: two, so calls can move between threads
/// (work stealing), unless a test asks for another count.
const DEFAULT_THREADS: usize = 2;

pub struct Sluice {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    child: Child,
    log: PathBuf,
    /// Shared with an upgraded successor, which reads the same config and socket path.
    dir: Arc<tempfile::TempDir>,
    /// Keys added to the listener (`tls:`, ...), indented for it.
    listener_extra: String,
    /// The config's `threads`.
    threads: usize,
    /// Keys added to the admin block (`token_file: ...`), indented for it.
    admin_extra: String,
}

/// Where an instance's files live, and the addresses its config names.
struct Layout {
    addr: SocketAddr,
    admin: SocketAddr,
    dir: Arc<tempfile::TempDir>,
    listener_extra: String,
    threads: usize,
    admin_extra: String,
}

impl Layout {
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sluice.yaml")
    }

    fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("upgrade.sock")
    }

    /// The config: this instance's listener and admin, then `rest`.
    fn write_config(&self, rest: &str) {
        let config = format!(
            "listeners:\n  - name: grpc\n    address: \"{}\"\n{}admin:\n  address: \"{}\"\n{}threads: {}\n\
             upgrade_sock: \"{}\"\nshutdown:\n  drain_timeout: 5s\n{rest}",
            self.addr,
            self.listener_extra,
            self.admin,
            self.admin_extra,
            self.threads,
            self.upgrade_sock().display()
        );
        std::fs::write(self.config_path(), config).expect("write config");
    }

    fn launch(self, upgrade: bool, log_name: &str) -> Sluice {
        let log = self.dir.path().join(log_name);
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.args(["run", "--config"]).arg(self.config_path());
        if upgrade {
            command.arg("--upgrade");
        }
        let child = command
            .env(
                "RUST_LOG",
                // The harness reads the bound addresses from sluice::server's info lines.
                format!(
                    "{},sluice::server=info",
                    std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info,sluice=debug".into())
                ),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn sluice");
        Sluice {
            addr: self.addr,
            admin: self.admin,
            config_path: self.config_path(),
            child,
            log,
            dir: self.dir,
            listener_extra: self.listener_extra,
            threads: self.threads,
            admin_extra: self.admin_extra,
        }
    }
}

impl Sluice {
    /// Starts `sluice run` with a listener and admin on port 0 and `rest` (clusters,
    /// routes, ...) appended to the config; returns once `/readyz` answers 200.
    pub async fn start(rest: &str) -> Sluice {
        Sluice::start_with_threads(DEFAULT_THREADS, rest).await
    }

    /// Like [`Sluice::start`], without waiting for `/readyz`: returns once sluice has logged
    /// the addresses it bound. The config file is then rewritten with those addresses, so a
    /// reload or an upgrade sees the same ones.
    pub async fn start_unready(rest: &str) -> Sluice {
        Sluice::start_unready_with_listener("", rest, DEFAULT_THREADS).await
    }

    /// Like [`Sluice::start`], with `threads` worker threads instead of two. One thread runs
    /// a single-thread scheduler; more run a work-stealing one.
    pub async fn start_with_threads(threads: usize, rest: &str) -> Sluice {
        let mut sluice = Sluice::start_unready_with_listener("", rest, threads).await;
        sluice.wait_ready().await;
        sluice
    }

    /// Like [`Sluice::start`], with `listener_extra` (lines indented by four spaces) added to
    /// the listener, such as its `tls:` block.
    pub async fn start_with_listener(listener_extra: &str, rest: &str) -> Sluice {
        let mut sluice =
            Sluice::start_unready_with_listener(listener_extra, rest, DEFAULT_THREADS).await;
        sluice.wait_ready().await;
        sluice
    }

    /// Like [`Sluice::start`], with the admin endpoint on `admin` (such as `0.0.0.0:0`, which
    /// is not a loopback address) instead of `127.0.0.1:0`, and `admin_extra` (lines indented
    /// by two spaces) added to its block.
    pub async fn start_with_admin(admin: SocketAddr, admin_extra: &str, rest: &str) -> Sluice {
        let mut sluice =
            Sluice::start_unready_on("", rest, DEFAULT_THREADS, (admin, admin_extra)).await;
        sluice.wait_ready().await;
        sluice
    }

    async fn start_unready_with_listener(
        listener_extra: &str,
        rest: &str,
        threads: usize,
    ) -> Sluice {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Sluice::start_unready_on(listener_extra, rest, threads, (loopback, "")).await
    }

    async fn start_unready_on(
        listener_extra: &str,
        rest: &str,
        threads: usize,
        (admin, admin_extra): (SocketAddr, &str),
    ) -> Sluice {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let layout = Layout {
            addr: any,
            admin,
            admin_extra: admin_extra.to_string(),
            dir: Arc::new(tempfile::tempdir().expect("tempdir")),
            listener_extra: listener_extra.to_string(),
            threads,
        };
        layout.write_config(rest);
        let mut sluice = layout.launch(false, "sluice.log");
        let budget = Duration::from_secs(30);
        let listener = address_in_log(&sluice.log, "listening listener=grpc", budget).await;
        let admin = address_in_log(&sluice.log, "admin endpoint", budget).await;
        match (listener, admin) {
            (Some(listener), Some(admin)) => (sluice.addr, sluice.admin) = (listener, admin),
            _ => panic!("sluice never reported its addresses:\n{}", sluice.log()),
        }
        sluice.rewrite_config(rest);
        sluice
    }

    /// Rewrites the config file (same listener and admin) with a new `rest`.
    pub fn rewrite_config(&self, rest: &str) {
        self.layout().write_config(rest);
    }

    fn layout(&self) -> Layout {
        Layout {
            addr: self.addr,
            admin: self.admin,
            dir: Arc::clone(&self.dir),
            listener_extra: self.listener_extra.clone(),
            threads: self.threads,
            admin_extra: self.admin_extra.clone(),
        }
    }

    /// `/backends`, parsed.
    pub async fn backends_view(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/backends")
            .await
            .expect("GET /backends");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/backends is JSON")
    }

    /// The addresses (with weights) of cluster `name`'s discovered backends (not those
    /// draining), sorted.
    pub async fn backends_of(&self, name: &str) -> Vec<(String, u64)> {
        let view = self.backends_view().await;
        let mut list: Vec<(String, u64)> = view["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .filter(|c| c["name"] == name)
            .flat_map(|c| c["backends"].as_array().cloned().unwrap_or_default())
            .filter(|b| b["state"] != "draining")
            .map(|b| {
                let address = b["address"].as_str().unwrap_or_default().to_string();
                (address, b["weight"].as_u64().unwrap_or_default())
            })
            .collect();
        list.sort();
        list
    }

    /// Polls `/backends` until cluster `name` has exactly `addresses` (any order), at most
    /// `budget`; returns whether it did.
    pub async fn wait_backends(
        &self,
        name: &str,
        addresses: &[SocketAddr],
        budget: Duration,
    ) -> bool {
        let mut want: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        want.sort();
        let end = Instant::now() + budget;
        loop {
            let have: Vec<String> = self
                .backends_of(name)
                .await
                .into_iter()
                .map(|(a, _)| a)
                .collect();
            if have == want {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `/backends` (at most 500 times, 10 ms apart) until the first cluster's backend
    /// `address` shows no upstream connection: sluice has read the EOF of a killed backend.
    /// Returns whether it did.
    pub async fn wait_no_connections(&self, address: SocketAddr) -> bool {
        let address = address.to_string();
        for _ in 0..500 {
            let view = self.backends_view().await;
            let connections = view["clusters"][0]["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["address"] == address.as_str())
                .and_then(|b| b["upstream_connections"].as_u64());
            if connections == Some(0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// The `discovery` object `/backends` shows for cluster `name`.
    pub async fn discovery_of(&self, name: &str) -> serde_json::Value {
        let view = self.backends_view().await;
        view["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["discovery"].clone())
            .unwrap_or_default()
    }

    /// Polls until cluster `name`'s discovery reports `connected == want`.
    pub async fn wait_discovery_connected(&self, name: &str, want: bool, budget: Duration) -> bool {
        let end = Instant::now() + budget;
        loop {
            if self.discovery_of(name).await["connected"] == want {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sluice exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < end,
                "sluice not ready in 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a second sluice with the same config and `--upgrade`, and returns once it
    /// waits for the listening sockets (send this one SIGQUIT next).
    pub async fn start_upgrade(&self) -> Sluice {
        let layout = self.layout();
        let socket = layout.upgrade_sock();
        let next = layout.launch(true, "sluice-upgraded.log");
        let waiting = wait_until(Duration::from_secs(20), || socket.exists()).await;
        assert!(
            waiting,
            "the new process never opened {}:\n{}",
            socket.display(),
            next.log()
        );
        next
    }

    /// A static cluster named `echo` over `backends`, with extra cluster keys.
    pub fn cluster(backends: &[SocketAddr], extra: &str) -> String {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        format!(
            "clusters:\n  - name: echo\n    discovery:\n      static: [{}]\n{extra}",
            list.join(", ")
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client on ONE HTTP/2 connection to sluice.
    pub async fn client(&self) -> EchoClient<Channel> {
        self.client_from("127.0.0.1".parse().expect("loopback"))
            .await
    }

    /// A client on one connection from `local`, another loopback address (127.0.0.2, ...):
    /// another client, to a sluice that tells clients apart by their IP.
    pub async fn client_from(&self, local: std::net::IpAddr) -> EchoClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .local_address(Some(local))
            .connect()
            .await
            .expect("connect to sluice");
        EchoClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    pub fn signal(&self, signal: &str) {
        send_signal(&self.child, signal);
    }

    /// The process's resident memory, in KiB (VmRSS).
    /// A line of the process's /proc status, without its label (`"THP_enabled"`).
    pub fn proc_status(&self, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let prefix = format!("{field}:");
        (status.lines())
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().to_string())
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()));
        (status.unwrap_or_default().lines())
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits for the process to exit, at most `budget`.
    pub async fn wait_exit(&mut self, budget: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + budget;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- sluice log {} ---\n{}", self.log.display(), self.log());
        }
    }
}

/// Runs `sluice ARGS...`; returns whether it exited 0, and its stdout and stderr.
pub fn sluice_command(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .expect("run sluice");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("admin read timed out"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

pub fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        ..Default::default()
    }
}

// === a scripted raw-h2 backend ===

// === scripted backends ===

/// A loopback listener whose every accepted connection runs `serve` in its own task; the
/// accept loop stops when this is dropped.
pub struct ScriptedListener {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedListener {
    pub async fn start<F, Fut>(serve: F) -> ScriptedListener
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp));
            }
        });
        ScriptedListener { addr, task }
    }
}

impl Drop for ScriptedListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the silent backend saw of one stream.
#[derive(Debug)]
pub struct SeenStream {
    pub grpc_timeout: Option<String>,
    /// The RST_STREAM reason the proxy sent, or `None` if none came within the budget.
    pub reset: Option<h2::Reason>,
    pub arrived: Instant,
    pub reset_at: Option<Instant>,
}

/// An HTTP/2 backend that accepts every stream and never answers: it reports what it saw,
/// including the reset the proxy sends when the call's deadline passes or the client leaves.
pub struct SilentBackend {
    pub addr: SocketAddr,
    pub arrivals: mpsc::UnboundedReceiver<()>,
    pub seen: mpsc::UnboundedReceiver<SeenStream>,
    _listener: ScriptedListener,
}

impl SilentBackend {
    pub async fn start() -> SilentBackend {
        let (arrived_tx, arrivals) = mpsc::unbounded_channel();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let listener = ScriptedListener::start(move |tcp| {
            let (arrived_tx, seen_tx) = (arrived_tx.clone(), seen_tx.clone());
            async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let (arrived_tx, seen_tx) = (arrived_tx.clone(), seen_tx.clone());
                    // Its own task: the connection is driven only while `accept` is polled.
                    tokio::spawn(async move {
                        let arrived = Instant::now();
                        let grpc_timeout = request
                            .headers()
                            .get("grpc-timeout")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let _ = arrived_tx.send(());
                        let reset = tokio::time::timeout(
                            Duration::from_secs(10),
                            std::future::poll_fn(|cx| respond.poll_reset(cx)),
                        )
                        .await;
                        let reset = reset.ok().and_then(Result::ok);
                        let _ = seen_tx.send(SeenStream {
                            grpc_timeout,
                            reset_at: reset.map(|_| Instant::now()),
                            reset,
                            arrived,
                        });
                        drop(request);
                    });
                }
            }
        })
        .await;
        SilentBackend {
            addr: listener.addr,
            arrivals,
            seen,
            _listener: listener,
        }
    }

    /// The next stream's report, within `budget`.
    pub async fn next_seen(&mut self, budget: Duration) -> SeenStream {
        tokio::time::timeout(budget, self.seen.recv())
            .await
            .expect("the backend reports within the budget")
            .expect("the backend is running")
    }
}

// === a raw h2 client, for what tonic hides or enforces itself ===

/// One HTTP/2 connection, driven in the background.
pub struct RawClient {
    sender: h2::client::SendRequest<bytes::Bytes>,
}

/// A finished raw call: response status and headers, DATA bytes, trailers.
#[derive(Debug)]
pub struct RawReply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<http::HeaderMap>,
}

impl RawReply {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only reply.
    pub fn grpc_status(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        RawClient { sender }
    }

    /// Sends one request with `body` and reads the whole reply (bounded by 10 s).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> RawReply {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("http://sluice{path}"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(()).expect("request");
        let sender = self.sender.clone().ready().await.expect("ready");
        let mut sender = sender;
        let (response, mut stream) = sender.send_request(request, false).expect("send");
        // The proxy may have answered (and closed the stream) before the body goes out, as it
        // does for a request that is not gRPC: the reply below is what the tests check.
        let _ = stream.send_data(bytes::Bytes::from(body), true);
        let reply = async {
            let response = response.await.expect("response");
            let (parts, mut body) = response.into_parts();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("body chunk");
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await.expect("trailers");
            RawReply {
                status: parts.status,
                headers: parts.headers,
                body: bytes,
                trailers,
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .expect("reply within 10 s")
    }
}

/// A gRPC-framed EchoRequest: 1 flag byte, 4 length bytes, the protobuf.
pub fn grpc_frame(message: &EchoRequest) -> Vec<u8> {
    use prost::Message;
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    frame.extend_from_slice(&encoded);
    frame
}

pub const GRPC_HEADERS: [(&str, &str); 2] =
    [("content-type", "application/grpc"), ("te", "trailers")];

/// An HTTP/2 backend that refuses every stream with REFUSED_STREAM (as a server at its
/// stream limit does), after reading the request body so the proxy must replay it.
pub struct RefusingBackend {
    pub addr: SocketAddr,
    pub refused: Arc<std::sync::atomic::AtomicU64>,
    _listener: ScriptedListener,
}

impl RefusingBackend {
    pub async fn start() -> RefusingBackend {
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&refused);
        let listener = ScriptedListener::start(move |tcp| {
            let counter = Arc::clone(&counter);
            async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let counter = Arc::clone(&counter);
                    // Its own task: the connection is driven only while `accept` is polled.
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let _ = body.data().await;
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    });
                }
            }
        })
        .await;
        RefusingBackend {
            addr: listener.addr,
            refused,
            _listener: listener,
        }
    }
}

/// A backend whose accept queue is full and never drained: connects to it hang (the kernel
/// drops the SYNs), as they do to a machine that stopped answering.
pub struct BlackholeBackend {
    pub addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

impl BlackholeBackend {
    pub async fn start() -> BlackholeBackend {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        // Fill the accept queue (backlog 1 holds 2 on Linux); later connects hang.
        let mut queued = Vec::new();
        for _ in 0..2 {
            queued.push(TcpStream::connect(addr).await.expect("fill the queue"));
        }
        let hangs = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr))
            .await
            .is_err();
        assert!(hangs, "connects to a full accept queue should hang");
        BlackholeBackend {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// An HTTP/2 backend scripted frame by frame: it answers the connection preface with SETTINGS,
/// acknowledges the client's SETTINGS, and meets the first HEADERS with
/// GOAWAY(last-stream-id 0, NO_ERROR): "I processed nothing". A stream refused that way never
/// reached the application, so the proxy may send it elsewhere.
pub struct GoawayBackend {
    pub addr: SocketAddr,
    pub goaways: Arc<std::sync::atomic::AtomicU64>,
    _listener: ScriptedListener,
}

impl GoawayBackend {
    pub async fn start() -> GoawayBackend {
        let goaways = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&goaways);
        let listener =
            ScriptedListener::start(move |tcp| GoawayBackend::serve(tcp, Arc::clone(&counter)))
                .await;
        GoawayBackend {
            addr: listener.addr,
            goaways,
            _listener: listener,
        }
    }

    async fn serve(mut tcp: TcpStream, goaways: Arc<std::sync::atomic::AtomicU64>) {
        const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
        const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];
        const GOAWAY_NOTHING_PROCESSED: [u8; 17] =
            [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut preface = [0u8; 24];
        if tcp.read_exact(&mut preface).await.is_err() || tcp.write_all(&SETTINGS).await.is_err() {
            return;
        }
        loop {
            let mut head = [0u8; 9];
            if tcp.read_exact(&mut head).await.is_err() {
                return;
            }
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
            let reply: &[u8] = match (head[3], head[4] & 1) {
                (4, 0) => &SETTINGS_ACK,
                (1, _) => {
                    goaways.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    &GOAWAY_NOTHING_PROCESSED
                }
                _ => continue,
            };
            if tcp.write_all(reply).await.is_err() {
                return;
            }
        }
    }
}
