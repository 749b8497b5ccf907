//! Waiting for a backend slot: a call that finds every backend of its cluster at
//! `max_concurrent_streams_per_backend` waits in the cluster's queue, bounded by
//! `queue_timeout` (never past its deadline) and `max_queued`, then is shed with
//! RESOURCE_EXHAUSTED, never an HTTP error.

use std::future::poll_fn;

use tokio::time::{sleep_until, Instant};

use std::sync::Arc;

use super::call::{Call, Downstream, Ending};
use crate::balance::{Backend, InFlight, Pick};
use crate::telemetry::Reject;
use crate::wire::{Code, ProxyStatus};

impl Call {
    /// Waits until a slot is freed for this call, or answers the call. `Ok(Some)`: a slot
    /// found right after joining the queue (one freed between the pick and the join);
    /// `Ok(None)`: woken at the head of the queue, pick again. `queued_since` is when the
    /// call first joined: set here on its first wait, and kept, so every wait of one call
    /// ends by the same `queue_timeout`. The caller counts the wait once, when a slot is
    /// found; this counts it when the call is shed.
    pub(super) async fn wait_for_slot(
        &mut self,
        down: &mut Downstream,
        tried: &[Arc<Backend>],
        queued_since: &mut Option<Instant>,
    ) -> Result<Option<(Arc<Backend>, InFlight)>, Ending> {
        let settings = &self.cluster.settings;
        let cluster = &self.cluster.name;
        let Some(mut waiter) = self.cluster.queue.join(settings.max_queued) else {
            let message = format!(
                "sluice: every backend of cluster {cluster} holds max_concurrent_streams_per_backend calls and {} calls already wait",
                settings.max_queued
            );
            let status = ProxyStatus::new(Code::ResourceExhausted, message);
            return Err(self.reject(down, Reject::Overloaded, status));
        };
        // A slot freed after the pick and before the join woke nobody: look once more.
        if let Pick::Backend(backend, slot) = self.cluster.pick(tried, true) {
            return Ok(Some((backend, slot)));
        }
        let started = *queued_since.get_or_insert_with(Instant::now);
        let until = (started + settings.queue_timeout).min(self.deadline);
        let woken = tokio::select! {
            biased;
            // A freed slot: this call is at the head of the queue.
            woken = &mut waiter.woken => woken.is_ok(),
            _ = sleep_until(until) => false,
            // The client left while waiting.
            _ = poll_fn(|cx| down.respond.poll_reset(cx)) => {
                return Err(Ending::proxy(Code::Cancelled));
            }
        };
        if woken {
            return Ok(None);
        }
        self.cluster.stats.queued(started.elapsed());
        *queued_since = None;
        if Instant::now() >= self.deadline {
            let message = "sluice: deadline exceeded while waiting for a backend slot";
            return Err(self.reject(
                down,
                Reject::Deadline,
                ProxyStatus::deadline_exceeded(message),
            ));
        }
        let message = format!(
            "sluice: every backend of cluster {cluster} is at max_concurrent_streams_per_backend ({}); waited {:?}",
            self.cluster.queue.cap(),
            settings.queue_timeout
        );
        let status = ProxyStatus::new(Code::ResourceExhausted, message);
        Err(self.reject(down, Reject::Overloaded, status))
    }
}
