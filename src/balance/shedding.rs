//! What an operator must see of overload, in the log: a cluster that starts shedding calls and,
//! once no call has been shed for a while, stops; and a backend whose concurrency limit halves
//! or doubles. Reviewed once a second (`server/background.rs`); the metrics
//! (`sluice_rejected_total`, `sluice_concurrency_limit`) carry the same, continuously.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tracing::{info, warn};

use super::Cluster;

/// Seconds without a shed call that end an overload.
const QUIET_SECONDS: u32 = 10;

/// A cluster's overload, as last reviewed.
#[derive(Debug, Default)]
pub(super) struct Shedding {
    active: AtomicBool,
    /// Calls shed since the cluster started, at the last review.
    seen: AtomicU64,
    /// Calls shed since the cluster started, when this overload began.
    began_at: AtomicU64,
    quiet: AtomicU32,
}

impl Shedding {
    /// Takes over the previous generation's state (on reload), so an overload that goes on
    /// is not announced again, and its end is.
    pub(super) fn carry_on(&self, previous: &Shedding) {
        let copy = |to: &AtomicU64, from: &AtomicU64| {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
        };
        copy(&self.seen, &previous.seen);
        copy(&self.began_at, &previous.began_at);
        self.quiet
            .store(previous.quiet.load(Ordering::Relaxed), Ordering::Relaxed);
        self.active
            .store(previous.active.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Cluster {
    /// Logs the changes an operator must see since the last review (call it once a second).
    pub fn review_overload(&self) {
        let shed = self.stats.shed();
        let state = &self.shedding;
        let new = shed.saturating_sub(state.seen.swap(shed, Ordering::Relaxed));
        if new > 0 {
            state.quiet.store(0, Ordering::Relaxed);
            if !state.active.swap(true, Ordering::Relaxed) {
                state.began_at.store(shed - new, Ordering::Relaxed);
                warn!(cluster = %self.name, shed.per_second = new, limits = %self.limits(),
                    "cluster overloaded: shedding calls its backends cannot answer in time");
            }
        } else if state.active.load(Ordering::Relaxed)
            && state.quiet.fetch_add(1, Ordering::Relaxed) + 1 >= QUIET_SECONDS
        {
            state.active.store(false, Ordering::Relaxed);
            let total = shed - state.began_at.load(Ordering::Relaxed);
            info!(cluster = %self.name, shed.total = total, limits = %self.limits(),
                "cluster no longer overloaded: no call shed for {QUIET_SECONDS} s");
        }
        for backend in &self.backends().backends {
            if let Some((was, now)) = backend.limit_moved() {
                let direction = if now < was { "fell" } else { "rose" };
                info!(cluster = %self.name, backend = %backend.address, limit = now,
                    limit.was = was, unanswered = backend.unanswered(),
                    "concurrency limit {direction}");
            }
        }
    }

    /// Calls wait for a backend slot, or the cluster shed calls within the last
    /// `QUIET_SECONDS`: no room for extra attempts (hedging stops).
    pub fn is_overloaded(&self) -> bool {
        !self.queue.is_empty() || self.shedding.active.load(Ordering::Relaxed)
    }

    /// Each backend's `unanswered/limit`, for the log.
    fn limits(&self) -> String {
        let set = self.backends();
        let limits: Vec<String> = (set.backends.iter())
            .map(|b| {
                let (unanswered, limit) = (b.unanswered(), b.concurrency_limit());
                format!("{}={unanswered}/{limit}", b.address)
            })
            .collect();
        limits.join(" ")
    }
}
