//! `sluice-loadtest incident`: the outage sluice was built for (README, "Why it exists"),
//! replayed through a proxy.
//!
//! Two backends (started here, on the given ports) sit behind the proxy under test, and one
//! client connection sends calls at a fixed rate with a 1 s deadline. After `slow_after`, backend
//! 2 fails in the chosen way ([`Failure`]). `slow`, the outage itself: +500 ms a call, and it
//! leaks: calls that started work run on after their callers gave up, holding one of its few
//! workers, so its queue and concurrency grow without bound, like the slow machine of that
//! outage. `fail-fast`: UNAVAILABLE at once. `hang`: stopped, its connections frozen.
//! `overload`: 4 workers of 1 + 50 ms each, about 78 calls/s, below its half of the rate.
//! The report says, per phase, the share each backend got; the latency and errors after the
//! failure began; and how many calls the failing backend started after their deadline had
//! passed (work nobody waited for).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::{self, BackendOptions, Failure, LoadBackend};
use crate::client::{self, RunOptions, Tally};

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
    pub failure: Failure,
}

/// `Failure::Overload`: the failing backend's workers and each call's work.
const OVERLOAD_WORKERS: usize = 4;
const OVERLOAD_WORK: Duration = Duration::from_millis(50);

#[derive(Debug, Serialize)]
pub struct IncidentReport {
    pub target: String,
    pub failure: Failure,
    /// Backend id -> share of the calls that reached a backend, before the slowdown.
    pub share_before: BTreeMap<String, f64>,
    /// The same after it. A hung backend counts nothing: its share is the calls the client
    /// sent that b1 did not receive.
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
        let failing = i == 1;
        let backend = LoadBackend::new(failing_backend(&options, failing));
        backend::start_on(*port, backend.clone()).await?;
        backends.push(backend);
    }
    let calls = Arc::new(RunOptions {
        duration: Some(options.duration),
        rate: Some(options.rate),
        ..RunOptions::unary_with_deadline(&options.target, options.deadline)
    });
    // One client connection, as in the incident: everything multiplexed on it.
    let connection = client::connect(&options.target, None).await?;
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
    let after = after.report(end.saturating_duration_since(slow_at));
    let after_counts = match options.failure {
        Failure::Hang => {
            let b1 = count(0, true);
            [b1, after.calls.saturating_sub(b1)]
        }
        _ => [count(0, true), count(1, true)],
    };
    Ok(IncidentReport {
        target: options.target,
        failure: options.failure,
        share_before: share([count(0, false), count(1, false)]),
        share_after: share(after_counts),
        after,
        started_past_deadline: backends[1]
            .stats
            .started_past_deadline
            .load(Ordering::Relaxed),
        slow_max_in_flight: backends[1].stats.max_in_flight.load(Ordering::Relaxed),
    })
}

/// Backend 1 stays well; backend 2 (`failing`) fails as `options.failure` says.
fn failing_backend(options: &IncidentOptions, failing: bool) -> BackendOptions {
    let (failure, slow_delay, workers) = match (failing, options.failure) {
        (false, _) => (Failure::Slow, Duration::ZERO, None),
        (true, Failure::Slow) => (
            Failure::Slow,
            options.slow_delay,
            Some(options.slow_workers),
        ),
        (true, Failure::Overload) => (Failure::Overload, OVERLOAD_WORK, Some(OVERLOAD_WORKERS)),
        (true, other) => (other, Duration::ZERO, None),
    };
    BackendOptions {
        id: format!("b{}", if failing { 2 } else { 1 }),
        delay: Duration::from_millis(1),
        slow_after: Some(options.slow_after),
        slow_delay,
        leak: failing && failure == Failure::Slow,
        workers,
        failure,
        detached: false,
    }
}

impl IncidentReport {
    pub fn print(&self) {
        println!(
            "incident replay through {} (failure: {:?})",
            self.target, self.failure
        );
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
