//! Hedged requests (a route's `hedging`): when the first attempt has not answered after the
//! delay, the same request goes to another backend. The first answer wins; the other attempts
//! are cancelled with RST_STREAM(CANCEL).
//!
//! A hedge goes out only when the whole request has arrived and the replay buffer holds it,
//! the call's deadline leaves more than the delay, the cluster is not overloaded (no call
//! waits for a slot, none was shed lately), no backend asked to be left alone
//! (`grpc-retry-pushback-ms`), and both the route's hedge budget and the cluster's retry
//! budget (shared with retries) allow one. A hedge that finds no budget asks again one delay
//! later: the calls still waiting then are the slowest, which is where hedges help.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use tokio::time::{sleep_until, Instant, Sleep};
use tracing::debug;

use super::attempt::lend;
use super::forward::{self, HeldBody};
use crate::balance::{Backend, Cluster, InFlight, Pick, RetryBudget};
use crate::config::{HedgeDelay, HedgingConfig};
use crate::telemetry::trace::{
    close_open, traceparent, AttemptKind, AttemptSpan, TraceId, TRACEPARENT,
};
use crate::telemetry::{Hedge, MethodStats};
use crate::transport::{leg, H2Settings, StreamSlot};
use crate::wire::{self, Code};

/// A route's hedging policy, and its budget.
#[derive(Debug)]
pub struct Hedging {
    delay: HedgeDelay,
    max_attempts: u32,
    budget: RetryBudget,
}

impl Hedging {
    pub fn new(config: &HedgingConfig) -> Hedging {
        Hedging {
            delay: config.delay,
            max_attempts: config.max_attempts.0,
            budget: RetryBudget::new(config.budget_ratio.0),
        }
    }

    /// A call took the route: it adds to the hedge budget.
    pub fn on_call(&self) {
        self.budget.on_request();
    }

    /// How long the first attempt may go unanswered before a hedge: the fixed delay, or the
    /// method's percentile on the cluster (`None` until enough calls have answered).
    pub(super) fn delay(&self, method: &MethodStats) -> Option<Duration> {
        match self.delay {
            HedgeDelay::Fixed(delay) => Some(delay),
            HedgeDelay::Percentile(p) => method.latency.percentiles.percentile(p),
        }
    }
}

/// A hedge that answered first: what the attempts loop needs to carry on with it as the
/// call's attempt.
pub(super) struct Launched {
    pub(super) backend: Arc<Backend>,
    pub(super) in_flight: InFlight,
    pub(super) slot: StreamSlot,
    pub(super) response: Response<leg::RecvStream>,
    pub(super) up_send: leg::SendStream,
    pub(super) picked_at: Instant,
    /// How long its answer took once its request went out.
    pub(super) answered_after: Duration,
}

/// How a hedge that did not answer first ended.
struct Failed {
    backend: Arc<Backend>,
    code: Code,
    /// The backend's `grpc-retry-pushback-ms`: `Some(None)` for "do not retry".
    pushback: Option<Option<Duration>>,
}

type Flight = Pin<Box<dyn Future<Output = Result<Launched, Failed>> + Send>>;

/// What a hedge is sent with, taken from the first attempt.
pub(super) struct HedgeBase {
    pub(super) cluster: Arc<Cluster>,
    pub(super) method: Arc<MethodStats>,
    pub(super) h2: H2Settings,
    pub(super) deadline: Instant,
    /// The request head as the first attempt sent it.
    pub(super) head: http::request::Parts,
    /// The call's trace id and sampling decision, when it is traced.
    pub(super) trace: Option<(TraceId, bool)>,
}

/// The hedges of one call, beside its first attempt.
pub(super) struct Hedger {
    policy: Arc<Hedging>,
    base: HedgeBase,
    delay: Duration,
    /// When to consider the next hedge; `None`: no more hedges.
    due: Option<Pin<Box<Sleep>>>,
    /// The backends with an attempt: the first, then each hedge's.
    tried: Vec<Arc<Backend>>,
    flights: Vec<Flight>,
    /// Spans of the hedges sent, when the call is traced.
    pub(super) spans: Vec<AttemptSpan>,
}

impl Hedger {
    /// The hedger of a first attempt sent now to `first`, hedged after `delay`.
    pub(super) fn new(
        policy: &Arc<Hedging>,
        base: HedgeBase,
        first: &Arc<Backend>,
        delay: Duration,
    ) -> Hedger {
        let sent_at = Instant::now();
        Hedger {
            policy: Arc::clone(policy),
            base,
            delay,
            due: Some(Box::pin(sleep_until(sent_at + delay))),
            tried: vec![Arc::clone(first)],
            flights: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// Hedges sent so far.
    pub(super) fn sent(&self) -> u32 {
        self.tried.len() as u32 - 1
    }

    /// Ready when a hedge is due.
    pub(super) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.due.as_mut() {
            Some(due) => due.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// A hedge is due: sends it if everything allows, with `body` (`None` while the request
    /// is still arriving, or when the replay could not hold it all).
    pub(super) fn on_due(&mut self, body: Option<HeldBody>, upload_running: bool) {
        let now = Instant::now();
        let attempts = self.tried.len() as u32;
        if attempts >= self.policy.max_attempts || now + self.delay >= self.base.deadline {
            self.due = None;
            return;
        }
        let body = match body {
            Some(body) => body,
            // Not all here yet: ask again one delay later.
            None if upload_running => return self.again(now),
            None => {
                self.due = None;
                return;
            }
        };
        let cluster = &self.base.cluster;
        if cluster.is_overloaded() || !self.withdraw() {
            return self.again(now);
        }
        match cluster.pick(&self.tried, false) {
            Pick::Backend(backend, in_flight)
                if !self.tried.iter().any(|t| Arc::ptr_eq(t, &backend)) =>
            {
                self.launch(backend, in_flight, body);
                self.again(now);
            }
            // No other backend has room: the budget goes back.
            _ => {
                self.policy.budget.refund();
                cluster.retry_budget.refund();
                self.again(now);
            }
        }
    }

    fn again(&mut self, now: Instant) {
        if let Some(due) = self.due.as_mut() {
            due.as_mut().reset(now + self.delay);
        }
    }

    /// One hedge from the route's budget and one from the cluster's, or none.
    fn withdraw(&self) -> bool {
        if !self.policy.budget.try_withdraw() {
            return false;
        }
        if !self.base.cluster.retry_budget.try_withdraw() {
            self.policy.budget.refund();
            return false;
        }
        true
    }

    fn launch(&mut self, backend: Arc<Backend>, in_flight: InFlight, body: HeldBody) {
        let mut head = self.base.head.clone();
        let headers = &mut head.headers;
        let remaining = self.base.deadline.saturating_duration_since(Instant::now());
        headers.insert(wire::GRPC_TIMEOUT, wire::encode_timeout(remaining));
        headers.insert(wire::GRPC_PREVIOUS_RPC_ATTEMPTS, self.tried.len().into());
        if let Some((trace_id, sampled)) = &self.base.trace {
            let span = AttemptSpan::open(&backend.address.0, AttemptKind::Hedge, Duration::ZERO);
            headers.insert(TRACEPARENT, traceparent(trace_id, &span.span_id, *sampled));
            self.spans.push(span);
        }
        debug!(backend = %backend.address, after = ?self.delay, "hedging");
        self.tried.push(Arc::clone(&backend));
        let flight = fly(
            Arc::clone(&self.base.cluster),
            Arc::clone(&self.base.method),
            self.base.h2,
            (backend, in_flight),
            (head, body),
        );
        self.flights.push(Box::pin(flight));
    }

    /// Ready with the first hedge that answers; a hedge that fails is counted and forgotten
    /// (and a pushback in its answer holds further hedges back).
    pub(super) fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Launched> {
        let mut i = 0;
        while i < self.flights.len() {
            let Poll::Ready(result) = self.flights[i].as_mut().poll(cx) else {
                i += 1;
                continue;
            };
            drop(self.flights.swap_remove(i));
            match result {
                Ok(launched) => return Poll::Ready(launched),
                Err(failed) => self.failed(failed),
            }
        }
        Poll::Pending
    }

    fn failed(&mut self, failed: Failed) {
        self.base.cluster.stats.hedged(Hedge::Failed);
        close_open(
            &mut self.spans,
            &failed.backend.address.0,
            failed.code,
            false,
        );
        match failed.pushback {
            Some(None) => self.due = None,
            Some(Some(wait)) => {
                if let Some(due) = self.due.as_mut() {
                    let at = due.deadline().max(Instant::now() + wait);
                    due.as_mut().reset(at);
                }
            }
            None => {}
        }
    }

    /// The call goes on without the hedges still in flight (an answer came, or the call
    /// ended): they are cancelled, counted as lost, and their spans closed. `winner`: a hedge
    /// answered first, and its span stays open for the attempt it becomes.
    pub(super) fn finish(mut self, winner: Option<&Arc<Backend>>) -> Vec<AttemptSpan> {
        let stats = &self.base.cluster.stats;
        // Dropping a flight drops its h2 stream handles: h2 resets the stream with CANCEL.
        let lost = std::mem::take(&mut self.flights).len();
        for _ in 0..lost {
            stats.hedged(Hedge::Lost);
        }
        if winner.is_some() {
            stats.hedged(Hedge::Won);
        }
        for span in self.spans.iter_mut().filter(|s| s.ended.is_none()) {
            if winner.is_none_or(|w| w.address.0 != span.backend) {
                span.close(Code::Cancelled, true);
            }
        }
        self.spans
    }
}

/// One hedge: lends a stream on `backend`, sends the request whole, and waits for the
/// response headers. An answer with a `retry_on` status is a failure: the first attempt may
/// still answer better.
async fn fly(
    cluster: Arc<Cluster>,
    method: Arc<MethodStats>,
    h2: H2Settings,
    (backend, mut in_flight): (Arc<Backend>, InFlight),
    (head, body): (http::request::Parts, HeldBody),
) -> Result<Launched, Failed> {
    let picked_at = Instant::now();
    let failed = |backend: &Arc<Backend>, code| Failed {
        backend: Arc::clone(backend),
        code,
        pushback: None,
    };
    let Ok((mut sender, slot)) = lend(&backend, &cluster, &h2).await else {
        return Err(failed(&backend, Code::Unavailable));
    };
    let sent_at = Instant::now();
    in_flight.sent(&method.latency);
    let end = body.is_empty();
    let Ok((response, mut up_send)) = leg::send_request(&mut sender, &head, &[], end) else {
        slot.mark_broken();
        return Err(failed(&backend, Code::Unavailable));
    };
    if !end && forward::send_held(&mut up_send, body).await.is_err() {
        return Err(failed(&backend, Code::Unavailable));
    }
    let Ok(response) = response.await else {
        return Err(failed(&backend, Code::Unavailable));
    };
    let after = sent_at.elapsed();
    in_flight.answered(sent_at - picked_at + after);
    method.latency.percentiles.record(after);
    if response.body().is_end_stream() {
        let code = Code::of_headers(response.headers());
        if cluster.settings.retries_on(code) {
            let pushback = wire::retry_pushback(response.headers());
            return Err(Failed {
                backend,
                code,
                pushback,
            });
        }
    }
    Ok(Launched {
        backend,
        in_flight,
        slot,
        response,
        up_send,
        picked_at,
        answered_after: after,
    })
}
