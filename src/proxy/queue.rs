//! Admission and waiting for a backend slot.
//!
//! A call whose remaining deadline is shorter than what it would face (its expected wait in
//! the queue plus the time its method's fast answers take) is answered DEADLINE_EXCEEDED at
//! once and never sent (`unmeetable_deadline`). A call that finds every backend of its cluster
//! at its limit waits in the cluster's queue, where clients take turns (balance/queue.rs),
//! bounded by `queue_timeout` and `max_queued`, then is shed with RESOURCE_EXHAUSTED and a
//! `grpc-retry-pushback-ms`, never an HTTP error. A waiting call leaves the queue the moment
//! its deadline can no longer be met.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, Instant};

use super::call::{Call, Downstream, Ending};
use super::client::client_id;
use super::Peer;
use crate::balance::{fast_latency, Backend, Cluster, InFlight, Pick, Waiter, Wake};
use crate::telemetry::Reject;
use crate::wire::{Code, ProxyStatus};

/// A call's time in the queue, from when it first joined until it gets a slot.
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    pub(super) since: Instant,
    /// Waiters to be served before it when it first joined.
    ahead: usize,
}

impl Queued {
    /// The call got its slot: its wait is counted, and teaches the queue's expected wait.
    /// Returns how long it waited.
    pub(super) fn served(self, cluster: &Cluster) -> Duration {
        let waited = self.since.elapsed();
        cluster.stats.queued(waited);
        cluster.queue.served(waited, self.ahead);
        waited
    }
}

/// `grpc-retry-pushback-ms` is the queue's expected drain time within these bounds, then
/// jittered by ±25%: from 37.5 ms to 12.5 s.
const PUSHBACK_RANGE: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(10));

/// What ended a wait in the queue without a slot.
enum WaitEnd {
    /// `queue_timeout` passed, or the wakeup was lost.
    TimedOut,
    /// The last moment a backend could still answer in time passed.
    Unmeetable,
    /// The queue was full, and this call's client had the most waiting.
    Displaced,
}

impl Call {
    /// How long the method's fast answers take (zero until it has been answered once): a
    /// call with less time left cannot be answered in time.
    fn fast_latency(&self) -> Duration {
        fast_latency(&self.method.latency)
    }

    /// Refuses, before anything else, a call whose remaining deadline is shorter than its
    /// method's fast answers take: no backend could answer it in time.
    pub(super) fn admit(&self, down: &mut Downstream) -> Result<(), Ending> {
        let fast = self.fast_latency();
        let now = Instant::now();
        // A deadline already passed is the attempts loop's to answer (`deadline`).
        if now >= self.deadline || now + fast <= self.deadline {
            return Ok(());
        }
        let left = self.deadline - now;
        let message =
            format!("sluice: {left:?} left of the deadline, and the method takes {fast:?} at best; not sent");
        Err(self.unmeetable(down, message))
    }

    fn unmeetable(&self, down: &mut Downstream, message: String) -> Ending {
        let status = ProxyStatus::deadline_exceeded(message);
        self.reject(down, Reject::UnmeetableDeadline, status)
    }

    /// Sheds the call for overload, telling a retrying client how long the queue needs: at
    /// least `waited`, what this call waited in vain.
    fn shed(
        &self,
        down: &mut Downstream,
        reason: Reject,
        waited: Duration,
        message: String,
    ) -> Ending {
        let (shortest, longest) = PUSHBACK_RANGE;
        let drain = (self.cluster.queue.expected_wait_of_newcomer()).max(waited);
        // Jittered, so the clients shed together do not come back together.
        let pushback = crate::pace::jitter(drain.clamp(shortest, longest), 0.75, 1.25);
        let status = ProxyStatus::resource_exhausted(message, pushback);
        self.reject(down, reason, status)
    }

    /// Waits until a slot is freed for this call, or answers the call. `Ok(Some)`: a slot
    /// found right after joining the queue (one freed between the pick and the join);
    /// `Ok(None)`: woken at the head of the queue, pick again. `waited` is set here on the
    /// call's first wait, and kept, so every wait of one call ends by the same
    /// `queue_timeout`. The caller counts the wait once, when a slot is found; this counts it
    /// when the call is shed.
    pub(super) async fn wait_for_slot(
        &mut self,
        down: &mut Downstream,
        peer: &Peer,
        tried: &[Arc<Backend>],
        waited: &mut Option<Queued>,
    ) -> Result<Option<(Arc<Backend>, InFlight)>, Ending> {
        // A first attempt woken in vain keeps its place. A retry does not: it may have passed
        // its wakeup on (a slot on a backend it tried), and at the head it would take the
        // wakeup back from the next retry so, round and round.
        let again = waited.is_some() && tried.is_empty();
        let fast = self.fast_latency();
        let mut waiter = self.join_queue(down, peer, tried, again, fast)?;
        // A slot freed after the pick and before the join woke nobody: look once more.
        if let Pick::Backend(backend, slot) = self.cluster.pick(tried, true) {
            return Ok(Some((backend, slot)));
        }
        let wait = *waited.get_or_insert(Queued {
            since: Instant::now(),
            ahead: waiter.ahead,
        });
        // The last moment a backend could still answer in time (a retry waits to the end: it
        // reached a backend once).
        let last_useful = match tried.is_empty() {
            true => self.deadline.checked_sub(fast),
            false => Some(self.deadline),
        };
        let last_useful = last_useful.unwrap_or(wait.since);
        let until = (wait.since + self.cluster.settings.queue_timeout).min(last_useful);
        let end = tokio::select! {
            biased;
            // A freed slot (this call's turn), or room made for another client's call.
            woken = &mut waiter.woken => match woken {
                Ok(Wake::Slot) => return Ok(None),
                Ok(Wake::Displaced) => WaitEnd::Displaced,
                Err(_) => WaitEnd::TimedOut,
            },
            _ = sleep_until(until) => match Instant::now() >= last_useful {
                true => WaitEnd::Unmeetable,
                false => WaitEnd::TimedOut,
            },
            // The client left while waiting.
            _ = poll_fn(|cx| down.respond.poll_reset(cx)) => {
                return Err(Ending::proxy(Code::Cancelled));
            }
        };
        drop(waiter);
        let waited_for = wait.since.elapsed();
        self.cluster.stats.queued(waited_for);
        *waited = None;
        Err(self.shed_after_wait(down, end, waited_for))
    }

    /// Joins the queue, or answers the call: shed when the queue is full, refused when the
    /// expected wait leaves too little time. The expected wait is judged before joining, so a
    /// call that will not wait never displaces another client's. `again`: woken before, and
    /// waiting again at its old place. `fast`: how long the method's fast answers take.
    fn join_queue(
        &self,
        down: &mut Downstream,
        peer: &Peer,
        tried: &[Arc<Backend>],
        again: bool,
        fast: Duration,
    ) -> Result<Waiter, Ending> {
        let (settings, queue) = (&self.cluster.settings, &self.cluster.queue);
        let headers = down.request.as_deref().map(|r| &r.headers);
        let client = headers.map_or(0, |h| client_id(&settings.client_key, peer, h));
        // A retry has reached a backend once; only a first attempt is judged so.
        if tried.is_empty() && !again {
            let expected = queue.expected_wait_for(client);
            if Instant::now() + expected + fast > self.deadline {
                let message = format!(
                    "sluice: the deadline cannot be met: about {expected:?} in the queue, then the method takes {fast:?} at best; not sent"
                );
                return Err(self.unmeetable(down, message));
            }
        }
        queue.join(client, settings.max_queued, again).ok_or_else(|| {
            let message = format!(
                "sluice: every backend of cluster {} is at its concurrency limit and {} calls already wait",
                self.cluster.name, settings.max_queued
            );
            self.shed(down, Reject::QueueFull, Duration::ZERO, message)
        })
    }

    /// Answers a call whose wait in the queue ended without a slot.
    fn shed_after_wait(&self, down: &mut Downstream, end: WaitEnd, waited: Duration) -> Ending {
        let cluster = &self.cluster.name;
        let now = Instant::now();
        if now >= self.deadline {
            let message = "sluice: deadline exceeded while waiting for a backend slot";
            let status = ProxyStatus::deadline_exceeded(message);
            return self.reject(down, Reject::Deadline, status);
        }
        match end {
            WaitEnd::Displaced => {
                let message = format!(
                    "sluice: cluster {cluster} is overloaded and its queue is full; this client has the most calls waiting"
                );
                self.shed(down, Reject::Displaced, waited, message)
            }
            WaitEnd::Unmeetable => {
                let message = format!(
                    "sluice: the deadline cannot be met: {:?} left after waiting for a backend slot, and the method takes {:?} at best; not sent",
                    self.deadline - now,
                    self.fast_latency()
                );
                self.unmeetable(down, message)
            }
            WaitEnd::TimedOut => {
                let message = format!(
                    "sluice: every backend of cluster {cluster} is at its concurrency limit; waited {:?}",
                    self.cluster.settings.queue_timeout
                );
                self.shed(down, Reject::QueueTimeout, waited, message)
            }
        }
    }
}
