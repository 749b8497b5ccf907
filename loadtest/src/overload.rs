//! `sluice-loadtest overload`: the whole service overloaded, replayed through a proxy.
//!
//! Backends (started here, on the given ports) each have a small pool of workers that take
//! `work` per call, so together they serve `capacity` calls a second. Calls are offered open
//! loop at `load` times that, each with a deadline, for `duration`. A backend that does not check
//! its context (the default) does every call it has queued, even after the caller has gone, as
//! a Go handler waiting on a small database pool would; one that checks (`checks_context`)
//! drops a call whose caller has gone. Each backend counts the work it started after the
//! caller's deadline: work nobody waits for.
//!
//! The report gives the goodput (calls answered OK within their deadline, per second, after
//! `warmup`) against the capacity, and the share of work started too late. Optionally the
//! offered load then drops to half the capacity for `relief` (how fast the proxy lets calls
//! through again), and one client may send ten times each other client's rate (whether the
//! others still get through).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::backend::{self, BackendOptions, Failure, LoadBackend};
use crate::client::{self, RunOptions};
use crate::pb::echo_client::EchoClient;
use sluice::config::parse_duration as duration;

/// `sluice-loadtest overload`'s options (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct OverloadOptions {
    #[arg(long)]
    pub target: String,
    /// The backend ports the proxy's config names.
    #[arg(long, value_delimiter = ',', default_value = "21091,21092,21093")]
    pub backend_ports: Vec<u16>,
    /// Each backend's workers, in the order of --backend-ports.
    #[arg(long, value_delimiter = ',', default_value = "2,2,2")]
    pub workers: Vec<usize>,
    /// The work of one call, once it has a worker.
    #[arg(long, default_value = "25ms", value_parser = duration)]
    pub work: Duration,
    /// Offered load, as a multiple of the backends' capacity.
    #[arg(long, default_value_t = 2.0)]
    pub load: f64,
    #[arg(long, default_value = "8s", value_parser = duration)]
    pub duration: Duration,
    /// Goodput counts the calls sent after this.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub deadline: Duration,
    /// The backends drop queued calls whose caller has gone (they check their context).
    #[arg(long)]
    pub checks_context: bool,
    /// Afterwards, offer half the capacity for this long, and report how many succeed.
    #[arg(long, value_parser = duration)]
    pub relief: Option<Duration>,
    /// One client sends 10x the rate of each of N others, each client on a connection of its
    /// own from its own loopback address (127.0.0.1 the heavy one, 127.0.0.2 and on the
    /// others).
    #[arg(long)]
    pub light_clients: Option<usize>,
}

/// How much more the heavy client sends than each light one.
const HEAVY_FACTOR: f64 = 10.0;

#[derive(Debug, Serialize)]
pub struct OverloadReport {
    pub target: String,
    /// Calls a second the backends can serve.
    pub capacity: f64,
    /// Calls a second offered.
    pub offered: f64,
    /// Calls a second answered OK within their deadline, of those sent after the warm-up.
    pub goodput: f64,
    /// `goodput` / `capacity`.
    pub goodput_share: f64,
    /// Codes of the calls sent after the warm-up (all clients).
    pub codes: BTreeMap<String, u64>,
    /// Latency of the OK calls sent after the warm-up, ms.
    pub ok_p50_ms: f64,
    pub ok_p99_ms: f64,
    /// Calls the backends started working on, and of those, started after their caller's
    /// deadline had passed.
    pub work_started: u64,
    pub work_started_late: u64,
    /// `work_started_late` / `work_started`.
    pub wasted_share: f64,
    /// With `relief`: the share of calls sent at half the capacity that succeeded.
    pub relief_success: Option<f64>,
    /// With `light_clients`: each client's share of OK calls after the warm-up, the heavy one
    /// first.
    pub clients: Vec<ClientReport>,
}

#[derive(Debug, Serialize)]
pub struct ClientReport {
    pub name: String,
    pub rate: f64,
    pub calls: u64,
    pub ok: u64,
    pub success: f64,
}

/// One sending client: its connection, its rate, and its name in the report.
struct Sender {
    name: String,
    connection: EchoClient<Channel>,
    rate: f64,
}

/// What one call came to: who sent it, when (against the run's start), how.
struct Outcome {
    client: usize,
    intended: Duration,
    result: client::CallResult,
}

pub async fn run(options: OverloadOptions) -> Result<OverloadReport, String> {
    if options.workers.len() != options.backend_ports.len() {
        return Err("--workers: one count per backend port".into());
    }
    let backends = start_backends(&options).await?;
    let capacity = options.workers.iter().sum::<usize>() as f64 / options.work.as_secs_f64();
    let offered = capacity * options.load;
    let senders = connect_senders(&options, offered).await?;
    let calls = Arc::new(RunOptions::unary_with_deadline(
        &options.target,
        options.deadline,
    ));
    warm_up(&senders, &calls, &backends).await;
    let outcomes = send_all(&options, &senders, &calls, capacity, offered).await?;
    let (started, late) = (backends.iter()).fold((0, 0), |(started, late), b| {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        let stats = &b.stats;
        (
            started + load(&stats.work_started),
            late + load(&stats.started_past_deadline),
        )
    });
    let measured = |o: &&Outcome| o.intended >= options.warmup && o.intended < options.duration;
    let window = options.duration.saturating_sub(options.warmup);
    let (codes, ok_latencies) = tally(&outcomes, measured)?;
    let goodput = codes.get("OK").copied().unwrap_or(0) as f64 / window.as_secs_f64().max(1e-9);
    let relief_success = options.relief.map(|_| {
        let in_relief = |o: &&Outcome| o.intended >= options.duration;
        let relief: Vec<_> = outcomes.iter().filter(in_relief).collect();
        let ok = relief
            .iter()
            .filter(|o| o.result.code == tonic::Code::Ok)
            .count();
        ok as f64 / relief.len().max(1) as f64
    });
    let clients = match options.light_clients {
        Some(_) => client_reports(&senders, &outcomes, measured),
        None => Vec::new(),
    };
    Ok(OverloadReport {
        target: options.target,
        capacity,
        offered,
        goodput,
        goodput_share: goodput / capacity,
        codes,
        ok_p50_ms: ok_latencies.value_at_quantile(0.5) as f64 / 1000.0,
        ok_p99_ms: ok_latencies.value_at_quantile(0.99) as f64 / 1000.0,
        work_started: started,
        work_started_late: late,
        wasted_share: late as f64 / started.max(1) as f64,
        relief_success,
        clients,
    })
}

/// A few calls from every client, so the proxy holds connections to every backend; then the
/// backends' work counts start from zero.
async fn warm_up(senders: &[Sender], calls: &RunOptions, backends: &[LoadBackend]) {
    for sender in senders {
        for _ in 0..10 {
            let mut connection = sender.connection.clone();
            let _ = client::call(&mut connection, calls, &[0; 100], Instant::now()).await;
        }
    }
    for backend in backends {
        backend.stats.work_started.store(0, Ordering::Relaxed);
        let late = &backend.stats.started_past_deadline;
        late.store(0, Ordering::Relaxed);
    }
}

/// Every client sends at its rate for `duration`, then (with `relief`) at its share of half
/// the capacity; returns every call's outcome.
async fn send_all(
    options: &OverloadOptions,
    senders: &[Sender],
    calls: &Arc<RunOptions>,
    capacity: f64,
    offered: f64,
) -> Result<Vec<Outcome>, String> {
    let (results, mut collected) = mpsc::unbounded_channel::<Outcome>();
    let started = Instant::now();
    let relief = options.relief.unwrap_or_default();
    let mut loops = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let share = sender.rate / offered;
        let phases = vec![
            (options.duration, sender.rate),
            (relief, capacity * 0.5 * share),
        ];
        let connection = sender.connection.clone();
        let sending = send_loop(
            index,
            connection,
            Arc::clone(calls),
            phases,
            started,
            results.clone(),
        );
        loops.push(tokio::spawn(sending));
    }
    drop(results);
    for sending in loops {
        sending.await.map_err(|e| e.to_string())?;
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = collected.recv().await {
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The codes of the `measured` calls, and the latencies of the OK ones (µs).
fn tally(
    outcomes: &[Outcome],
    measured: impl Fn(&&Outcome) -> bool,
) -> Result<(BTreeMap<String, u64>, hdrhistogram::Histogram<u64>), String> {
    let mut codes = BTreeMap::new();
    let mut ok_latencies = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for outcome in outcomes.iter().filter(measured) {
        let code = client::code_name(outcome.result.code).to_string();
        *codes.entry(code).or_insert(0) += 1;
        if outcome.result.code == tonic::Code::Ok {
            let _ = ok_latencies.record(outcome.result.latency.as_micros() as u64);
        }
    }
    Ok((codes, ok_latencies))
}

/// Each backend with its workers, from the start: work `options.work` a call, done even after
/// the caller has gone unless `checks_context`.
async fn start_backends(options: &OverloadOptions) -> Result<Vec<LoadBackend>, String> {
    let mut backends = Vec::new();
    for (i, (port, workers)) in options
        .backend_ports
        .iter()
        .zip(&options.workers)
        .enumerate()
    {
        let backend = LoadBackend::new(BackendOptions {
            id: format!("b{}", i + 1),
            delay: options.work,
            slow_after: None,
            slow_delay: Duration::ZERO,
            leak: false,
            workers: Some(*workers),
            failure: Failure::Slow,
            detached: !options.checks_context,
        });
        backend::start_on(*port, backend.clone()).await?;
        backends.push(backend);
    }
    Ok(backends)
}

/// One connection sending everything (as in the incident), or with `light_clients`, a heavy
/// client and light ones, each from its own loopback address.
async fn connect_senders(options: &OverloadOptions, offered: f64) -> Result<Vec<Sender>, String> {
    let Some(light) = options.light_clients else {
        let connection = client::connect(&options.target, None).await?;
        let name = "client".to_string();
        return Ok(vec![Sender {
            name,
            connection,
            rate: offered,
        }]);
    };
    let share = offered / (HEAVY_FACTOR + light as f64);
    let mut senders = Vec::new();
    for i in 0..=light {
        let local: IpAddr = format!("127.0.0.{}", i + 1)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let connection = client::connect_from(&options.target, local).await?;
        let (name, rate) = match i {
            0 => ("heavy".to_string(), share * HEAVY_FACTOR),
            i => (format!("light-{i}"), share),
        };
        senders.push(Sender {
            name,
            connection,
            rate,
        });
    }
    Ok(senders)
}

/// Sends calls open loop, at each phase's rate for its length, and hands back every outcome.
async fn send_loop(
    client: usize,
    connection: EchoClient<Channel>,
    calls: Arc<RunOptions>,
    phases: Vec<(Duration, f64)>,
    started: Instant,
    results: mpsc::UnboundedSender<Outcome>,
) {
    let mut phase_start = started;
    let mut tasks = Vec::new();
    for (length, rate) in phases {
        if length.is_zero() || rate <= 0.0 {
            continue;
        }
        let period = Duration::from_secs_f64(1.0 / rate);
        let end = phase_start + length;
        let mut next = phase_start;
        while next < end {
            tokio::time::sleep_until(next.into()).await;
            let (mut connection, calls, results) =
                (connection.clone(), Arc::clone(&calls), results.clone());
            let intended = next;
            tasks.push(tokio::spawn(async move {
                let result = client::call(&mut connection, &calls, &[0; 100], intended).await;
                let intended = intended - started;
                let _ = results.send(Outcome {
                    client,
                    intended,
                    result,
                });
            }));
            next += period;
        }
        phase_start = end;
    }
    for task in tasks {
        let _ = task.await;
    }
}

fn client_reports(
    senders: &[Sender],
    outcomes: &[Outcome],
    measured: impl Fn(&&Outcome) -> bool,
) -> Vec<ClientReport> {
    (senders.iter().enumerate())
        .map(|(index, sender)| {
            let (calls, ok) = (outcomes.iter())
                .filter(|o| o.client == index)
                .filter(&measured)
                .fold((0, 0), |(n, ok), o| {
                    (n + 1, ok + u64::from(o.result.code == tonic::Code::Ok))
                });
            ClientReport {
                name: sender.name.clone(),
                rate: sender.rate,
                calls,
                ok,
                success: ok as f64 / calls.max(1) as f64,
            }
        })
        .collect()
}

impl OverloadReport {
    pub fn print(&self) {
        println!(
            "overload through {}: capacity {:.0} calls/s, offered {:.0}/s",
            self.target, self.capacity, self.offered
        );
        println!(
            "  goodput {:.0}/s ({:.0}% of capacity); OK p50 {:.1} ms, p99 {:.1} ms; {:?}",
            self.goodput,
            self.goodput_share * 100.0,
            self.ok_p50_ms,
            self.ok_p99_ms,
            self.codes
        );
        println!(
            "  work started {}, of which after the caller's deadline {} ({:.1}%)",
            self.work_started,
            self.work_started_late,
            self.wasted_share * 100.0
        );
        if let Some(success) = self.relief_success {
            println!(
                "  at half capacity afterwards: {:.1}% succeeded",
                success * 100.0
            );
        }
        for client in &self.clients {
            println!(
                "  client {} at {:.0}/s: {} of {} OK ({:.1}%)",
                client.name,
                client.rate,
                client.ok,
                client.calls,
                client.success * 100.0
            );
        }
    }
}
