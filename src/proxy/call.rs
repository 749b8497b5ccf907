//! One call after routing: its deadline, and the attempts loop that picks a backend, tries it,
//! and retries elsewhere what never reached a backend's application.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use smallvec::SmallVec;
use tokio::time::Instant;
use tracing::debug;

use super::attempt::Start;
use super::forward::Replay;
use super::hedge::{HedgeBase, Hedger, Hedging, Launched};
use super::outcome::RetryReason;
use super::queue::Queued;
use super::{reply, Peer};
use crate::balance::{Backend, Cluster, Pick};
use crate::telemetry::trace::{AttemptKind, CallTrace};
use crate::telemetry::{MethodStats, Reject};
use crate::transport::H2Settings;
use crate::wire::{Code, Origin, ProxyStatus};

/// One call in flight, from routing to its end.
pub(super) struct Call {
    pub(super) cluster: Arc<Cluster>,
    /// The called method's counters, and its latency baseline for the balancer.
    pub(super) method: Arc<MethodStats>,
    pub(super) h2: H2Settings,
    pub(super) deadline: Instant,
    pub(super) summary: Summary,
    /// The access log reads the request's path and trace header when the call ends; without
    /// it, the request is freed once the backend has answered (no retry can need it then),
    /// which a long-lived stream would otherwise hold for its whole life.
    pub(super) keep_request: bool,
    /// The route's `cluster_header`: the backend's answer names the cluster in it.
    pub(super) cluster_header: Option<http::HeaderName>,
    /// The route's hedging, when it hedges.
    pub(super) hedging: Option<Arc<Hedging>>,
}

/// The client's side of a call. Built before the call's task starts and used in place, never
/// moved: an async fn keeps its arguments for its whole life, so a move into a local would
/// hold a second copy in every call's future.
pub(super) struct Downstream {
    /// Kept whole so a retry can resend the headers; `None` once the backend has answered,
    /// unless the access log needs it (`Call::keep_request`). Boxed, so that a held stream
    /// carries neither the request nor its room in the call's future.
    pub(super) request: Option<Box<http::request::Parts>>,
    pub(super) body: RecvStream,
    pub(super) respond: SendResponse<Bytes>,
    /// Request DATA bytes read from the client (the upload counts them as they pass).
    pub(super) bytes_in: AtomicU64,
    /// A gRPC-Web call or preflight on an HTTP/2 stream: answered by `web`, not as a native
    /// call.
    pub(super) web: bool,
}

impl Downstream {
    pub(super) fn new(request: http::Request<RecvStream>, respond: SendResponse<Bytes>) -> Self {
        let (request, body) = request.into_parts();
        Downstream {
            request: Some(Box::new(request)),
            body,
            respond,
            bytes_in: AtomicU64::new(0),
            web: false,
        }
    }
}

/// What the access log needs of a finished call besides its status.
#[derive(Debug, Default)]
pub(super) struct Summary {
    pub(super) attempts: u32,
    /// The backend of the last attempt.
    pub(super) backend: Option<Arc<Backend>>,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    /// The call's spans, when `tracing` is on.
    pub(super) trace: Option<Box<CallTrace>>,
}

/// How a call ended: its gRPC status, who decided it, and why sluice did when it answered
/// without a backend's answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ending {
    pub(super) code: Code,
    pub(super) origin: Origin,
    pub(super) rejected: Option<Reject>,
}

impl Ending {
    pub(super) fn proxy(code: Code) -> Ending {
        Ending {
            code,
            origin: Origin::Proxy,
            rejected: None,
        }
    }

    pub(super) fn upstream(code: Code) -> Ending {
        Ending {
            code,
            origin: Origin::Upstream,
            rejected: None,
        }
    }
}

/// How one attempt ended, for the attempts loop.
pub(super) enum AttemptEnd {
    /// The call is over: answered by the backend or by the proxy, or abandoned by the client.
    Done(Ending),
    /// The request never reached the backend's application: another backend may take it.
    Retry(RetryReason),
    /// A hedge answered first: the call carries on with it.
    Hedged(Box<Launched>),
}

impl AttemptEnd {
    /// The attempt's own status, for its span: what a retried attempt ended with counts as
    /// UNAVAILABLE unless the backend answered a status.
    fn code(&self) -> Code {
        match self {
            AttemptEnd::Done(ending) => ending.code,
            AttemptEnd::Retry(RetryReason::Answered { code, .. }) => *code,
            AttemptEnd::Retry(_) => Code::Unavailable,
            AttemptEnd::Hedged(_) => Code::Cancelled,
        }
    }
}

impl Call {
    pub(super) fn new(
        cluster: Arc<Cluster>,
        method: Arc<MethodStats>,
        h2: H2Settings,
        deadline: Instant,
    ) -> Call {
        Call {
            cluster,
            method,
            h2,
            deadline,
            summary: Summary::default(),
            keep_request: true,
            cluster_header: None,
            hedging: None,
        }
    }

    /// Runs the call to its end, and counts it in its method's stats. Returns how it ended
    /// and its summary (for the access log).
    /// (Not an `async fn`, which would keep a second copy of `self`: see `serve_call`.)
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run<'a>(
        mut self,
        down: &'a mut Downstream,
        peer: &'a Peer,
        started: Instant,
    ) -> impl Future<Output = (Ending, Summary)> + Send + 'a {
        async move {
            let ending = self.attempts(down, peer).await;
            self.summary.bytes_in = down.bytes_in.load(Ordering::Relaxed);
            let elapsed = started.elapsed();
            self.method.record(ending.code, ending.origin, elapsed);
            (ending, self.summary)
        }
    }

    /// Picks a backend and tries it, again on another backend while the attempt may be
    /// retried, the budget allows, and the deadline has not passed.
    async fn attempts(&mut self, down: &mut Downstream, peer: &Peer) -> Ending {
        self.cluster.retry_budget.on_request();
        if let Err(ending) = self.admit(down) {
            return ending;
        }
        // Inline for the first two attempts: most calls make one, and a heap Vec here was an
        // allocation per call, held for the call's whole life.
        let mut tried: SmallVec<[Arc<Backend>; 2]> = SmallVec::new();
        let mut replay = Replay::default();
        // True right after a wait in the queue: this call picks before those behind it.
        let mut queued = false;
        // From the call's first wait in the queue until it gets a slot: a call woken for a
        // slot it cannot use waits again within the same `queue_timeout`, and its wait is
        // counted once.
        let mut waited: Option<Queued> = None;
        loop {
            // A call whose deadline has passed is never dispatched.
            if Instant::now() >= self.deadline {
                if queued {
                    // It was woken for a slot it will not use: pass the wakeup on.
                    self.cluster.queue.slot_freed();
                }
                if let Some(wait) = waited {
                    self.cluster.stats.queued(wait.since.elapsed());
                }
                let message = "sluice: deadline exceeded before the call reached a backend";
                return self.reject(
                    down,
                    Reject::Deadline,
                    ProxyStatus::deadline_exceeded(message),
                );
            }
            let picked = self.cluster.pick(&tried, queued);
            if queued && !tried.is_empty() && !matches!(picked, Pick::Backend(..)) {
                // A retry woken for a slot on a backend it tried already: pass the wakeup
                // on. (A first attempt that finds nothing was woken for a slot on a backend
                // no one may use, one ejected or failing its checks: passing that on would
                // only send it round the queue.)
                self.cluster.queue.slot_freed();
            }
            let (backend, in_flight) = match picked {
                Pick::Backend(backend, in_flight) => (backend, in_flight),
                Pick::Full => match self.wait_for_slot(down, peer, &tried, &mut waited).await {
                    Ok(Some(found)) => found,
                    Ok(None) => {
                        queued = true;
                        continue;
                    }
                    Err(ending) => return ending,
                },
                Pick::Empty => {
                    let message = format!(
                        "sluice: cluster {} has no backends (none discovered, or all drained)",
                        self.cluster.name
                    );
                    let status = ProxyStatus::unavailable(message);
                    return self.reject(down, Reject::NoBackend, status);
                }
            };
            queued = false;
            let queue_wait = waited.take().map(|wait| wait.served(&self.cluster));
            tried.push(Arc::clone(&backend));
            self.summary.attempts = tried.len() as u32;
            self.summary.backend = Some(Arc::clone(&backend));
            self.attempt_began(&backend, queue_wait);
            let start = Start::Picked(&backend, in_flight);
            let mut end = self.attempt(down, start, &mut replay).await;
            self.attempt_ended(&backend, &end);
            while let AttemptEnd::Hedged(launched) = end {
                let backend = Arc::clone(&launched.backend);
                tried.push(Arc::clone(&backend));
                self.summary.backend = Some(Arc::clone(&backend));
                // Boxed: a rare path, kept out of every call's future.
                end = Box::pin(self.attempt(down, Start::Hedge(launched), &mut replay)).await;
                self.attempt_ended(&backend, &end);
            }
            let reason = match end {
                AttemptEnd::Done(ending) => return ending,
                AttemptEnd::Retry(reason) => reason,
                AttemptEnd::Hedged(_) => unreachable!("the loop above takes every hedge"),
            };
            let attempts = tried.len() as u32;
            if self.may_retry(attempts, &replay) {
                debug!(%reason, attempt = attempts, "retrying on another backend");
                self.cluster.stats.retried();
                if let RetryReason::Answered { .. } = reason {
                    self.back_off().await;
                }
                continue;
            }
            return self.give_up(down, reason, attempts);
        }
    }

    /// A traced call's attempt is about to go out: its span opens, and its id goes upstream
    /// in `traceparent`.
    fn attempt_began(&mut self, backend: &Backend, queue_wait: Option<Duration>) {
        if let Some(trace) = self.summary.trace.as_mut() {
            let kind = match self.summary.attempts {
                1 => AttemptKind::First,
                _ => AttemptKind::Retry,
            };
            let queue_wait = queue_wait.unwrap_or_default();
            trace.begin_attempt(&backend.address.0, kind, queue_wait);
        }
    }

    /// A traced call's attempt ended: its span closes with its status (a first attempt that
    /// a hedge beat, as cancelled by it; a winning hedge's span opened when it went out).
    fn attempt_ended(&mut self, backend: &Backend, end: &AttemptEnd) {
        if let Some(trace) = self.summary.trace.as_mut() {
            let hedged = matches!(end, AttemptEnd::Hedged(_));
            trace.end_attempt(&backend.address.0, end.code(), hedged);
        }
    }

    /// The first attempt's hedger, on a route that hedges once the delay is known.
    pub(super) fn hedger(
        &self,
        request: &http::request::Parts,
        first: &Arc<Backend>,
    ) -> Option<Box<Hedger>> {
        let policy = self
            .hedging
            .as_ref()
            .filter(|_| self.summary.attempts == 1)?;
        let delay = policy.delay(&self.method)?;
        let base = HedgeBase {
            cluster: Arc::clone(&self.cluster),
            method: Arc::clone(&self.method),
            h2: self.h2,
            deadline: self.deadline,
            head: request.clone(),
            trace: (self.summary.trace.as_ref()).map(|t| (t.trace_id, t.sampled)),
        };
        Some(Box::new(Hedger::new(policy, base, first, delay)))
    }

    /// Another attempt is allowed: attempts left, the whole request still held for replay,
    /// time left, and a token from the cluster's retry budget (taken last, only if needed).
    fn may_retry(&self, attempts: u32, replay: &Replay) -> bool {
        attempts < self.cluster.settings.max_attempts
            && replay.is_complete()
            && Instant::now() < self.deadline
            && self.cluster.retry_budget.try_withdraw()
    }

    /// A short jittered pause (5 to 25 ms, never past the deadline) before retrying a call a
    /// backend answered with a `retry_on` status: the next backend may be under the same
    /// pressure.
    async fn back_off(&self) {
        let pause = std::time::Duration::from_millis(fastrand::u64(5..=25));
        tokio::time::sleep_until((Instant::now() + pause).min(self.deadline)).await;
    }

    /// The last attempt ended in a way that could be retried, and no retry follows.
    fn give_up(&mut self, down: &mut Downstream, reason: RetryReason, attempts: u32) -> Ending {
        if let RetryReason::Answered { code, head, .. } = reason {
            // The backend's own answer goes to the client as it came.
            let _ = down
                .respond
                .send_response(http::Response::from_parts(*head, ()), true);
            return Ending::upstream(code);
        }
        if let RetryReason::Lost { .. } = reason {
            // A backend took the call and lost it: not a call sluice turned away, whatever
            // the time.
            let message = format!("sluice: {reason} (after {attempts} attempts)");
            reply::status(&mut down.respond, ProxyStatus::unavailable(message));
            return Ending::proxy(Code::Unavailable);
        }
        if Instant::now() >= self.deadline {
            let message = format!("sluice: deadline exceeded after {reason}");
            return self.reject(
                down,
                Reject::Deadline,
                ProxyStatus::deadline_exceeded(message),
            );
        }
        if let RetryReason::Refused(_) = reason {
            // gRPC clients retry REFUSED_STREAM on their own: pass it through unchanged.
            down.respond.send_reset(Reason::REFUSED_STREAM);
            return Ending::upstream(Code::Unavailable);
        }
        let message = format!("sluice: {reason} (after {attempts} attempts)");
        self.reject(down, Reject::NoBackend, ProxyStatus::unavailable(message))
    }

    /// Answers the call with the proxy's own status before any backend answered, and counts
    /// why.
    pub(super) fn reject(
        &self,
        down: &mut Downstream,
        reason: Reject,
        status: ProxyStatus,
    ) -> Ending {
        self.cluster.stats.rejected(reason);
        let ending = Ending {
            rejected: Some(reason),
            ..Ending::proxy(status.code)
        };
        reply::status(&mut down.respond, status);
        ending
    }
}
