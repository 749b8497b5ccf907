//! `sluice-loadtest incident`: the outage sluice was built for (README, "Why it exists"),
//! replayed through a proxy.
//!
//! Two backends (started here, on the given ports) sit behind the proxy under test, and one
//! client connection sends calls at a fixed rate with a 1 s deadline. After `slow_after`, backend
//! 2 turns slow (+500 ms a call) and leaks: calls that started work run on after their callers
//! gave up, holding one of its few workers, so its queue and concurrency grow without bound,
//! like the slow machine of that outage. The report says, per phase,
//! the share each backend got; the latency and errors after the slowdown; and how many calls
//! the slow backend started after their deadline had passed (work nobody waited for).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::backend::{self, BackendOptions, LoadBackend};
use crate::client::{self, Kind, RunOptions, Tally};

#[derive(Debug, Clone)]
pub struct IncidentOptions {
    /// The proxy's listener.
    pub target: String,
    /// Where the two backends listen (the proxy's config names them).
    pub backend_ports: [u16; 2],
    pub slow_after: Duration,
    pub slow_delay: Duration,
    pub duration: Duration,
    pub rate: f64,
    pub deadline: Duration,
    /// The slow backend's worker pool: calls beyond it queue.
    pub slow_workers: usize,
}

#[derive(Debug, Serialize)]
pub struct IncidentReport {
    pub target: String,
    /// Backend id -> share of the calls that reached a backend, before the slowdown.
    pub share_before: BTreeMap<String, f64>,
    /// The same after it.
    pub share_after: BTreeMap<String, f64>,
    /// Latency and codes of the calls sent after the slowdown.
    pub after: client::Report,
    /// Calls the slow backend started although their deadline had already passed.
    pub started_past_deadline: u64,
    /// The slow backend's highest concurrency.
    pub slow_max_in_flight: u64,
}

pub async fn run(options: IncidentOptions) -> Result<IncidentReport, String> {
    // Both backends split their counts at the same moment; only backend 2 slows down there.
    let t0 = Instant::now();
    let slow_at = t0 + options.slow_after;
    let mut backends = Vec::new();
    for (i, port) in options.backend_ports.iter().enumerate() {
        let slow = i == 1;
        let backend = LoadBackend::new(BackendOptions {
            id: format!("b{}", i + 1),
            delay: Duration::from_millis(1),
            slow_after: Some(options.slow_after),
            slow_delay: if slow {
                options.slow_delay
            } else {
                Duration::ZERO
            },
            leak: slow,
            workers: slow.then_some(options.slow_workers),
        });
        let listener = TcpListener::bind(("127.0.0.1", *port))
            .await
            .map_err(|e| format!("backend port {port}: {e}"))?;
        let serving = backend.clone();
        tokio::spawn(async move {
            let _ = backend::serve(listener, serving).await;
        });
        backends.push(backend);
    }
    let calls = Arc::new(RunOptions {
        targets: vec![options.target.clone()],
        connections: 1,
        streams: 1,
        calls: None,
        duration: Some(options.duration),
        rate: Some(options.rate),
        payload: 100,
        kind: Kind::Unary,
        messages: 1,
        deadline: Some(options.deadline),
        progress: false,
    });
    // One client connection, as in the incident: everything multiplexed on it.
    let connection = client::connect(&options.target).await?;
    // Warm-up, so the proxy holds connections to both backends; not counted.
    for _ in 0..20 {
        let _ = client::call(&mut connection.clone(), &calls, &[0; 100], Instant::now()).await;
    }
    let warm: Vec<u64> = backends
        .iter()
        .map(|b| b.stats.calls_before_slow.load(Ordering::Relaxed))
        .collect();

    let started = Instant::now();
    let end = t0 + options.duration;
    let period = Duration::from_secs_f64(1.0 / options.rate);
    let (results, mut collected) = mpsc::unbounded_channel::<(Instant, client::CallResult)>();
    let collector = tokio::spawn(async move {
        let mut after = Tally::default();
        while let Some((intended, result)) = collected.recv().await {
            if intended >= slow_at {
                after.record(result);
            }
        }
        after
    });
    let mut next = started;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let mut connection = connection.clone();
        let calls = Arc::clone(&calls);
        let results = results.clone();
        let intended = next;
        tokio::spawn(async move {
            let result = client::call(&mut connection, &calls, &[0; 100], intended).await;
            let _ = results.send((intended, result));
        });
        next += period;
    }
    drop(results);
    let after = collector.await.map_err(|e| e.to_string())?;

    let share = |counts: [u64; 2]| {
        let total: u64 = counts.iter().sum();
        counts
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("b{}", i + 1), *n as f64 / total.max(1) as f64))
            .collect::<BTreeMap<_, _>>()
    };
    let count = |i: usize, after: bool| {
        let stats = &backends[i].stats;
        if after {
            stats.calls_after_slow.load(Ordering::Relaxed)
        } else {
            stats.calls_before_slow.load(Ordering::Relaxed) - warm[i]
        }
    };
    Ok(IncidentReport {
        target: options.target,
        share_before: share([count(0, false), count(1, false)]),
        share_after: share([count(0, true), count(1, true)]),
        after: after.report(end.saturating_duration_since(slow_at)),
        started_past_deadline: backends[1]
            .stats
            .started_past_deadline
            .load(Ordering::Relaxed),
        slow_max_in_flight: backends[1].stats.max_in_flight.load(Ordering::Relaxed),
    })
}

impl IncidentReport {
    pub fn print(&self) {
        println!("incident replay through {}", self.target);
        let pct = |m: &BTreeMap<String, f64>| {
            m.iter()
                .map(|(b, s)| format!("{b} {:.1}%", s * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("  share before the slowdown: {}", pct(&self.share_before));
        println!("  share after the slowdown:  {}", pct(&self.share_after));
        println!(
            "  after: {} calls, p50 {:.1} ms, p99 {:.1} ms, errors {} {:?}",
            self.after.calls,
            self.after.p50_ms,
            self.after.p99_ms,
            self.after.errors,
            self.after.codes
        );
        println!(
            "  slow backend: {} calls started past their deadline, at most {} in flight",
            self.started_past_deadline, self.slow_max_in_flight
        );
    }
}
