//! `sluice-loadtest soak`: a long open-loop run while the proxy's resident memory is sampled,
//! to show it stays flat (no leak per call).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{self, Report, RunOptions};

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub load: Report,
    /// (seconds since start, RSS in KiB), one sample per interval.
    pub rss_kib: Vec<(f64, u64)>,
    /// The samples after warm-up (the first quarter of the run) stay within this fraction of
    /// their median, in both directions.
    pub max_deviation: f64,
}

/// The process's resident set, from `/proc/PID/status` (VmRSS, in KiB).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub async fn run(options: RunOptions, pid: u32, every: Duration) -> Result<SoakReport, String> {
    rss_kib(pid).ok_or_else(|| format!("--watch-pid {pid}: no such process"))?;
    let started = Instant::now();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => {}
            }
            match rss_kib(pid) {
                Some(rss) => samples.push((started.elapsed().as_secs_f64(), rss)),
                None => return samples,
            }
            if *stopped.borrow() {
                return samples;
            }
        }
    });
    let load = client::run(options).await;
    // The last sample is taken as the load ends.
    let _ = stop.send(true);
    let rss = sampler.await.unwrap_or_default();
    let load = load?;
    Ok(summarize(load, rss))
}

fn summarize(load: Report, rss_kib: Vec<(f64, u64)>) -> SoakReport {
    let steady: Vec<u64> = rss_kib
        .iter()
        .skip(rss_kib.len() / 4)
        .map(|(_, r)| *r)
        .collect();
    let mut sorted = steady.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0) as f64;
    let max_deviation = steady
        .iter()
        .map(|r| (*r as f64 - median).abs() / median.max(1.0))
        .fold(0.0, f64::max);
    SoakReport {
        load,
        rss_kib,
        max_deviation,
    }
}
