//! `sluice-loadtest run`: the load client.
//!
//! - **Closed loop:** `connections` HTTP/2 connections, each with `streams` workers that send a
//!   call as soon as their previous one ends, for a number of calls or a duration.
//! - **Open loop** (`rate`): calls are sent on a fixed schedule whatever the answers do, and
//!   latency runs from each call's *intended* send time. A stall then shows in the percentiles
//!   instead of silently lowering the rate (coordinated omission).
//!
//! Every call records its latency (HdrHistogram), its gRPC code, and which backend answered
//! (the `x-backend-id` response header).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::backend::{DEADLINE_HEADER, HOLD};
use crate::pb::echo_client::EchoClient;
use crate::pb::EchoRequest;

/// What each call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One request, one response.
    Unary,
    /// One request, `messages` responses.
    ServerStream,
    /// Open a server stream that stays silent; hold it for the whole run (memory scenario).
    Hold,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `HOST:PORT`s; connection `i` goes to target `i % len` (several targets: "direct").
    pub targets: Vec<String>,
    pub connections: usize,
    pub streams: usize,
    pub calls: Option<u64>,
    pub duration: Option<Duration>,
    /// Calls per second, open loop; `None` is closed loop.
    pub rate: Option<f64>,
    pub payload: usize,
    pub kind: Kind,
    pub messages: u32,
    pub deadline: Option<Duration>,
    pub progress: bool,
    /// Speak TLS, trusting this CA (PEM) and checking `tls_name`.
    pub tls: Option<Tls>,
    /// Closed loop: each worker opens a new connection after this many calls (connection
    /// churn), instead of sharing its connection for the whole run.
    pub calls_per_connection: Option<u64>,
}

impl RunOptions {
    /// Unary calls of 100 bytes to `target`, one connection, each with `deadline`: what the
    /// incident and overload drivers send (they set the pace themselves).
    pub fn unary_with_deadline(target: &str, deadline: Duration) -> RunOptions {
        RunOptions {
            targets: vec![target.to_string()],
            connections: 1,
            streams: 1,
            calls: None,
            duration: None,
            rate: None,
            payload: 100,
            kind: Kind::Unary,
            messages: 1,
            deadline: Some(deadline),
            progress: false,
            tls: None,
            calls_per_connection: None,
        }
    }
}

/// TLS to the target: the CA that signed its certificate, and the name to check.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca_pem: String,
    pub name: String,
}

/// The result of a run, as printed and as JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    pub calls: u64,
    pub seconds: f64,
    pub calls_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Calls by gRPC code name (OK included).
    pub codes: BTreeMap<String, u64>,
    /// Answered calls by backend id.
    pub backends: BTreeMap<String, u64>,
    pub errors: u64,
}

/// One finished call.
pub struct CallResult {
    pub latency: Duration,
    pub code: tonic::Code,
    pub backend: Option<String>,
}

/// Collects call results into percentiles and counts.
pub struct Tally {
    latency_us: Histogram<u64>,
    codes: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            // 1 µs to 10 min at 3 significant digits: constant, valid bounds (low >= 1,
            // high >= 2 * low, 0-5 digits), so creation cannot fail.
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
            codes: BTreeMap::new(),
            backends: BTreeMap::new(),
        }
    }
}

impl Tally {
    pub fn record(&mut self, result: CallResult) {
        let micros = (result.latency.as_micros() as u64).clamp(1, 600_000_000);
        let _ = self.latency_us.record(micros);
        *self.codes.entry(code_name(result.code).into()).or_default() += 1;
        if let Some(backend) = result.backend {
            *self.backends.entry(backend).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: Tally) {
        let _ = self.latency_us.add(&other.latency_us);
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
        for (backend, n) in other.backends {
            *self.backends.entry(backend).or_default() += n;
        }
    }

    pub fn report(self, elapsed: Duration) -> Report {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let calls = self.latency_us.len();
        let errors = calls - self.codes.get("OK").copied().unwrap_or(0);
        Report {
            calls,
            seconds: elapsed.as_secs_f64(),
            calls_per_second: calls as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.latency_us.max() as f64 / 1000.0,
            codes: self.codes,
            backends: self.backends,
            errors,
        }
    }
}

/// Go's name of a gRPC code, as sluice's metrics use.
pub fn code_name(code: tonic::Code) -> &'static str {
    sluice::wire::Code::from_status(code as u32).go_name()
}

/// Opens one HTTP/2 connection to `target`, over TLS when `tls` is set.
pub async fn connect(target: &str, tls: Option<&Tls>) -> Result<EchoClient<Channel>, String> {
    connect_with(target, tls, None).await
}

/// A cleartext connection from `local`, a loopback address of its own: another client, as a
/// proxy that tells clients apart by their IP sees it.
pub async fn connect_from(target: &str, local: IpAddr) -> Result<EchoClient<Channel>, String> {
    connect_with(target, None, Some(local)).await
}

async fn connect_with(
    target: &str,
    tls: Option<&Tls>,
    local: Option<IpAddr>,
) -> Result<EchoClient<Channel>, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{target}"))
        .map_err(|e| format!("{target}: {e}"))?
        .local_address(local);
    if let Some(tls) = tls {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
            .domain_name(tls.name.clone());
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("{target}: TLS: {e}"))?;
    }
    let channel = endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    Ok(EchoClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// Sends one call and reports how it ended; latency runs from `since`.
pub async fn call(
    client: &mut EchoClient<Channel>,
    options: &RunOptions,
    payload: &[u8],
    since: Instant,
) -> CallResult {
    let mut message = EchoRequest {
        payload: payload.to_vec(),
        repeat: options.messages,
        ..Default::default()
    };
    if options.kind == Kind::Hold {
        message.message = HOLD.into();
    }
    let mut request = tonic::Request::new(message);
    if let Some(deadline) = options.deadline {
        // The remaining budget from the intended send time, so an open-loop call that starts
        // late does not get extra time.
        let remaining = deadline.saturating_sub(since.elapsed());
        request.set_timeout(remaining.max(Duration::from_millis(1)));
        let absolute = SystemTime::now() + remaining;
        if let Ok(ms) = absolute.duration_since(UNIX_EPOCH) {
            if let Ok(value) = ms.as_millis().to_string().parse() {
                request.metadata_mut().insert(DEADLINE_HEADER, value);
            }
        }
    }
    let backend_of = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get("x-backend-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (code, backend) = match options.kind {
        Kind::Unary => match client.unary(request).await {
            Ok(response) => (tonic::Code::Ok, backend_of(response.metadata())),
            Err(status) => (status.code(), None),
        },
        Kind::ServerStream | Kind::Hold => match client.server_stream(request).await {
            Ok(response) if options.kind == Kind::Hold => {
                // Held open and silent for the run's duration, then dropped (a cancel).
                let backend = backend_of(response.metadata());
                tokio::time::sleep(options.duration.unwrap_or(Duration::from_secs(10))).await;
                drop(response);
                (tonic::Code::Ok, backend)
            }
            Ok(response) => {
                let backend = backend_of(response.metadata());
                let mut stream = response.into_inner();
                let mut code = tonic::Code::Ok;
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(status) => {
                            code = status.code();
                            break;
                        }
                    }
                }
                (code, backend)
            }
            Err(status) => (status.code(), None),
        },
    };
    CallResult {
        latency: since.elapsed(),
        code,
        backend,
    }
}

fn progress_bar(options: &RunOptions) -> Option<ProgressBar> {
    if !options.progress {
        return None;
    }
    let bar = match (options.calls, options.duration) {
        (Some(calls), _) => ProgressBar::new(calls),
        (None, Some(duration)) => ProgressBar::new(duration.as_secs().max(1)),
        (None, None) => return None,
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// Runs the load and returns the report.
pub async fn run(options: RunOptions) -> Result<Report, String> {
    if options.targets.is_empty() {
        return Err("--target: at least one HOST:PORT".into());
    }
    if options.calls.is_none() && options.duration.is_none() {
        return Err("give --calls or --duration".into());
    }
    let mut clients = Vec::with_capacity(options.connections);
    for i in 0..options.connections.max(1) {
        let target = &options.targets[i % options.targets.len()];
        clients.push(connect(target, options.tls.as_ref()).await?);
    }
    let payload: Arc<[u8]> = vec![0x5a; options.payload].into();
    let options = Arc::new(options);
    let bar = progress_bar(&options);
    let started = Instant::now();
    let tally = match options.rate {
        None => closed_loop(&clients, &options, &payload, started, bar.as_ref()).await,
        Some(rate) => open_loop(&clients, &options, &payload, rate, started, bar.as_ref()).await,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(tally.report(started.elapsed()))
}

/// Every worker sends its next call when its last one ends.
async fn closed_loop(
    clients: &[EchoClient<Channel>],
    options: &Arc<RunOptions>,
    payload: &Arc<[u8]>,
    started: Instant,
    bar: Option<&ProgressBar>,
) -> Tally {
    let issued = Arc::new(AtomicU64::new(0));
    let end = options.duration.map(|d| started + d);
    let mut workers = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for _ in 0..options.streams.max(1) {
            let mut client = client.clone();
            let target = options.targets[c % options.targets.len()].clone();
            let mut on_connection = 0u64;
            let options = Arc::clone(options);
            let payload = Arc::clone(payload);
            let issued = Arc::clone(&issued);
            let bar = bar.cloned();
            workers.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    if let Some(limit) = options.calls {
                        if issued.fetch_add(1, Ordering::Relaxed) >= limit {
                            break;
                        }
                    }
                    if end.is_some_and(|end| Instant::now() >= end) {
                        break;
                    }
                    if options
                        .calls_per_connection
                        .is_some_and(|n| on_connection >= n)
                    {
                        // A new connection (and, with TLS, a full handshake) for the next calls.
                        match connect(&target, options.tls.as_ref()).await {
                            Ok(fresh) => client = fresh,
                            // Counted as an error; the old connection serves the next call.
                            Err(_) => *tally.codes.entry("ConnectFailed".into()).or_default() += 1,
                        }
                        on_connection = 0;
                    }
                    on_connection += 1;
                    let result = call(&mut client, &options, &payload, Instant::now()).await;
                    tally.record(result);
                    if let Some(bar) = &bar {
                        if options.calls.is_some() {
                            bar.inc(1);
                        } else {
                            bar.set_position(started.elapsed().as_secs());
                        }
                    }
                }
                tally
            }));
        }
    }
    let mut tally = Tally::default();
    for worker in workers {
        if let Ok(part) = worker.await {
            tally.merge(part);
        }
    }
    tally
}

/// Calls go out on schedule, `rate` per second, spread over the connections.
async fn open_loop(
    clients: &[EchoClient<Channel>],
    options: &Arc<RunOptions>,
    payload: &Arc<[u8]>,
    rate: f64,
    started: Instant,
    bar: Option<&ProgressBar>,
) -> Tally {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let total = match (options.calls, options.duration) {
        (Some(calls), _) => calls,
        (None, Some(duration)) => (duration.as_secs_f64() * rate) as u64,
        (None, None) => 0,
    };
    let (results, mut collected) = mpsc::unbounded_channel::<CallResult>();
    let collector = tokio::spawn(async move {
        let mut tally = Tally::default();
        while let Some(result) = collected.recv().await {
            tally.record(result);
        }
        tally
    });
    for i in 0..total {
        let intended = started + period.mul_f64(i as f64);
        tokio::time::sleep_until(intended.into()).await;
        let mut client = clients[i as usize % clients.len()].clone();
        let options = Arc::clone(options);
        let payload = Arc::clone(payload);
        let results = results.clone();
        tokio::spawn(async move {
            let result = call(&mut client, &options, &payload, intended).await;
            let _ = results.send(result);
        });
        if let Some(bar) = bar {
            bar.inc(1);
        }
    }
    drop(results);
    collector.await.unwrap_or_default()
}

impl Report {
    /// A plain table for a terminal.
    pub fn print(&self) {
        println!(
            "calls {}  in {:.2} s  = {:.0} calls/s   errors {}",
            self.calls, self.seconds, self.calls_per_second, self.errors
        );
        println!(
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        );
        println!("codes:");
        for (code, n) in &self.codes {
            println!("  {code:<20} {n}");
        }
        let answered: u64 = self.backends.values().sum();
        println!("backends (share of answered calls):");
        for (backend, n) in &self.backends {
            println!(
                "  {backend:<20} {n:>10}  {:5.1}%",
                100.0 * *n as f64 / answered.max(1) as f64
            );
        }
    }
}
