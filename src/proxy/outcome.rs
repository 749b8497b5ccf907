//! How an attempt ended, and what that means. [`Call::settle`] is the one place that turns an
//! [`Outcome`] into what the client sees (the backend's answer, a proxy status, a reset), what
//! the backend sees (an RST_STREAM or not), and what is counted.

use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, SendStream};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::call::{AttemptEnd, Call, Downstream, Ending};
use super::forward::PipeError;
use super::hedge::Launched;
use super::reply;
use crate::balance::{clock_ns, Backend, Sample};
use crate::config::BackendAddr;
use crate::telemetry::Reject;
use crate::transport::{ConnectError, StreamSlot};
use crate::wire::{Code, ProxyStatus};

/// Why an attempt may be retried on another backend: the backend refused it or never
/// processed it, answered a status `retry_on` names, or lost its connection as the request
/// went out (judged by time, `LOST_AT_ONCE`), before any application could act on it.
#[derive(Debug, thiserror::Error)]
pub(super) enum RetryReason {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("backend {0} refused the stream (REFUSED_STREAM)")]
    Refused(String),
    #[error("backend {0} sent GOAWAY before processing the stream")]
    GoAway(String),
    /// The connection died right after the request went out, before any byte of the response
    /// came back (`retry.on_lost_connection`, `LOST_AT_ONCE`).
    #[error("connection to backend {address} lost as the request went out: {error}")]
    Lost { address: String, error: String },
    /// The backend answered a `retry.retry_on` status before any response message; the
    /// answer is kept, to pass on if no retry follows.
    #[error("backend {address} answered {code:?}")]
    Answered {
        address: String,
        code: Code,
        head: Box<http::response::Parts>,
    },
}

/// What an attempt's steps saw.
pub(super) enum Outcome {
    /// The response, trailers included, reached the client, with this status.
    Finished(Code),
    /// No stream could be had: the connect or handshake failed.
    ConnectFailed(ConnectError),
    /// The request never reached the backend's application.
    Retry(RetryReason),
    /// The client reset the stream or went away: reset upstream with the same reason.
    ClientGone(Reason),
    /// The deadline passed (while connecting, or while the backend held the call).
    DeadlineExceeded,
    /// The backend failed before its response headers; `broken` when its connection did.
    BackendFailed { status: ProxyStatus, broken: bool },
    /// The backend reset the stream after its response headers: pass the reset on.
    UpstreamReset(Reason),
    /// The backend's connection broke after its response headers.
    UpstreamLost(String),
    /// A hedge answered before this attempt: cancel it and carry on with the hedge.
    HedgeWon(Box<Launched>),
}

/// The pieces of an attempt that its outcome acts on; each is there once its step was reached.
pub(super) struct Legs<'a> {
    pub(super) backend: &'a Backend,
    pub(super) picked_at: Instant,
    /// The backend's unanswered calls when it was picked, this one included.
    pub(super) load: u64,
    pub(super) slot: Option<&'a StreamSlot>,
    /// The upstream stream: the request headers went to the backend.
    pub(super) upstream: Option<&'a mut crate::transport::leg::SendStream>,
    /// The downstream response stream: the response headers went to the client.
    pub(super) downstream: Option<&'a mut SendStream<Bytes>>,
    /// How long the backend took to its response headers, when they came.
    pub(super) headers_after: Option<Duration>,
}

impl<'a> Legs<'a> {
    pub(super) fn new(backend: &'a Backend, picked_at: Instant, load: u64) -> Legs<'a> {
        Legs {
            backend,
            picked_at,
            load,
            slot: None,
            upstream: None,
            downstream: None,
            headers_after: None,
        }
    }

    fn mark_broken(&self) {
        if let Some(slot) = self.slot {
            slot.mark_broken();
        }
    }
}

impl Call {
    /// Acts on how an attempt ended. Counting: an attempt whose request was sent is recorded on
    /// the backend with its code (UNAVAILABLE for one refused before processing); a failed
    /// connect is recorded as a connect failure; a deadline that passes while connecting counts
    /// as a rejection. A server-side failure code (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL,
    /// UNAVAILABLE, DATA_LOSS) on a sent attempt also weighs the backend down in the balancer. An attempt that may be retried is handed back to the attempts loop
    /// (`call.rs`), which answers the client itself when no retry follows.
    pub(super) fn settle(
        &mut self,
        down: &mut Downstream,
        mut legs: Legs<'_>,
        outcome: Outcome,
    ) -> AttemptEnd {
        let backend = legs.backend;
        let address = &backend.address;
        let ending = match outcome {
            Outcome::Finished(code) => Ending::upstream(code),
            // Another call's connect failed moments ago: that one counted it.
            Outcome::ConnectFailed(error @ ConnectError::JustFailed { .. }) => {
                return AttemptEnd::Retry(RetryReason::Connect(error));
            }
            Outcome::ConnectFailed(error) => {
                if backend.connect_failed() {
                    warn!(cluster = %self.cluster.name, backend = %address, %error,
                        "backend unhealthy: connect failed; skipped while it backs off");
                }
                backend.stats.record_connect_failure();
                self.cluster.attempt_ended(backend, true);
                return AttemptEnd::Retry(RetryReason::Connect(error));
            }
            Outcome::Retry(reason) => return self.retry(&legs, reason),
            Outcome::HedgeWon(launched) => {
                // Not a failure of this backend: only slower than another, this once.
                if let Some(upstream) = legs.upstream.as_deref_mut() {
                    upstream.send_reset(Reason::CANCEL);
                }
                return AttemptEnd::Hedged(launched);
            }
            Outcome::ClientGone(reason) => {
                debug!(?reason, backend = %address, "client left; resetting upstream");
                if let Some(upstream) = legs.upstream.as_deref_mut() {
                    upstream.send_reset(reason);
                }
                Ending::proxy(Code::Cancelled)
            }
            Outcome::DeadlineExceeded => self.deadline_passed(down, &mut legs),
            Outcome::BackendFailed { status, broken } => {
                if broken {
                    legs.mark_broken();
                }
                let ending = Ending::proxy(status.code);
                reply::status(&mut down.respond, status);
                ending
            }
            Outcome::UpstreamReset(reason) => {
                if let Some(downstream) = legs.downstream.as_deref_mut() {
                    downstream.send_reset(reason);
                }
                Ending::upstream(Code::of_reset(reason))
            }
            Outcome::UpstreamLost(error) => {
                legs.mark_broken();
                let message = format!("sluice: connection to backend {address} lost: {error}");
                if let Some(downstream) = legs.downstream.as_deref_mut() {
                    let status = ProxyStatus::unavailable(message);
                    let _ = downstream.send_trailers(status.to_trailers());
                }
                Ending::proxy(Code::Unavailable)
            }
        };
        if legs.upstream.is_some() {
            backend.stats.record(ending.code, legs.picked_at.elapsed());
            self.judge(&legs, ending.code);
        }
        AttemptEnd::Done(ending)
    }

    /// An attempt that may be retried. A backend's `retry_on` answer counts like any answer,
    /// and a lost connection like an UNAVAILABLE answer (a failure, and its connection is
    /// retired); a stream the backend refused or never processed counts as UNAVAILABLE once
    /// sent, and a GOAWAY retires its connection.
    fn retry(&self, legs: &Legs<'_>, reason: RetryReason) -> AttemptEnd {
        let (backend, elapsed) = (legs.backend, legs.picked_at.elapsed());
        match &reason {
            RetryReason::Answered { code, .. } => {
                backend.stats.record(*code, elapsed);
                self.judge(legs, *code);
            }
            RetryReason::Lost { .. } => {
                legs.mark_broken();
                backend.stats.record(Code::Unavailable, elapsed);
                self.judge(legs, Code::Unavailable);
            }
            RetryReason::GoAway(_) | RetryReason::Refused(_) | RetryReason::Connect(_) => {
                if let RetryReason::GoAway(_) = reason {
                    legs.mark_broken();
                }
                if legs.upstream.is_some() {
                    backend.stats.record(Code::Unavailable, elapsed);
                }
            }
        }
        AttemptEnd::Retry(reason)
    }

    /// Tells the balancer, the concurrency limit and outlier detection how a sent attempt
    /// ended. One sample per attempt: a server-side failure counts as the worst latency,
    /// however fast it came (a backend that fails fast must not look fast); otherwise the time
    /// to response headers.
    ///
    /// A deadline that passes after the response headers came (a long stream, a long poll)
    /// is the client's choice, not the backend's failure. RESOURCE_EXHAUSTED is a backend
    /// shedding load: a bad sample for the balancer and, answered before any message, a drop
    /// for the concurrency limit, though not a failure to eject for; a deadline that passes
    /// before it answers is a drop too.
    fn judge(&self, legs: &Legs<'_>, code: Code) {
        let (backend, headers_after) = (legs.backend, legs.headers_after);
        let answered_in_time = code == Code::DeadlineExceeded && headers_after.is_some();
        let failed = code.is_server_error() && !answered_in_time;
        let latency = &self.method.latency;
        // One clock read for the balancer's and the limit's samples.
        let now = clock_ns();
        if failed || code == Code::ResourceExhausted {
            backend.observe_failure();
        } else if let Some(rtt) = headers_after {
            backend.observe_latency(rtt, latency, now);
        }
        // RESOURCE_EXHAUSTED in trailers after response messages ends a stream that ran: it
        // says nothing of the load the call met.
        let shed = code == Code::ResourceExhausted && legs.downstream.is_none();
        let dropped = shed || (code == Code::DeadlineExceeded && headers_after.is_none());
        let sample = match headers_after {
            _ if dropped => Some(Sample::Dropped),
            Some(rtt) if !failed => Some(Sample::Answered(rtt.as_nanos() as f64)),
            _ => None,
        };
        if let Some(sample) = sample {
            backend.observe_limit(sample, legs.load, latency, now);
        }
        // A cancelled call says nothing about the backend either way.
        if code != Code::Cancelled {
            self.cluster.attempt_ended(backend, failed);
        }
    }

    /// The deadline passed. While connecting, it is a rejection; while the backend held the
    /// call, the backend must stop working on a call nobody waits for: reset it upstream.
    fn deadline_passed(&self, down: &mut Downstream, legs: &mut Legs<'_>) -> Ending {
        let address = &legs.backend.address;
        let Some(upstream) = legs.upstream.as_deref_mut() else {
            let message =
                format!("sluice: deadline exceeded while connecting to backend {address}");
            let status = ProxyStatus::deadline_exceeded(message);
            return self.reject(down, Reject::Deadline, status);
        };
        upstream.send_reset(Reason::CANCEL);
        let message = format!("sluice: deadline exceeded while backend {address} was working");
        let status = ProxyStatus::deadline_exceeded(message);
        // After the response headers, the status can only travel in trailers.
        match legs.downstream.as_deref_mut() {
            Some(downstream) => {
                let _ = downstream.send_trailers(status.to_trailers());
            }
            None => reply::status(&mut down.respond, status),
        }
        Ending::proxy(Code::DeadlineExceeded)
    }
}

/// What a failed upload means for the attempt: the client leaving ends it; an upstream
/// failure does not, as it shows on the response too.
pub(super) fn upload_failed(error: PipeError) -> Option<Outcome> {
    match error {
        PipeError::Source(error) => Some(Outcome::ClientGone(client_reason(&error))),
        PipeError::Sink(_) => None,
    }
}

/// What the end of the response pipe means: the trailers' status, or a failure of one side.
pub(super) fn response_ended(result: Result<Option<Code>, PipeError>) -> Outcome {
    match result {
        // No trailers (END_STREAM on DATA): gRPC clients see Unknown or Internal; Unknown is
        // what the backend left unsaid.
        Ok(status) => Outcome::Finished(status.unwrap_or(Code::Unknown)),
        Err(PipeError::Sink(reason)) => Outcome::ClientGone(reason),
        Err(PipeError::Source(error)) if error.is_reset() => {
            Outcome::UpstreamReset(error.reason().unwrap_or(Reason::CANCEL))
        }
        Err(PipeError::Source(error)) => Outcome::UpstreamLost(error.to_string()),
    }
}

/// A connection that dies this soon after a call's request went out, before any byte of its
/// answer, was lost at once: a backend already gone (killed, crashed, its host down) resets
/// a request within a round trip, before any application could act on it. A call the
/// backend held longer was in its hands (docs/configuration.md, "Retries").
pub(super) const LOST_AT_ONCE: Duration = Duration::from_millis(50);

/// Sorts an upstream failure before any response header: retry what the backend cannot have
/// processed, and, with `retry_lost`, a call whose connection died at once (`LOST_AT_ONCE`);
/// answer UNAVAILABLE for the rest. Uses `is_reset()`, not `reason()`: a GOAWAY error
/// carries a reason too.
pub(super) fn before_headers(
    error: &h2::Error,
    address: &BackendAddr,
    retry_lost: bool,
) -> Outcome {
    let address = address.to_string();
    if error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM) {
        return Outcome::Retry(RetryReason::Refused(address));
    }
    // A GOAWAY fails only the streams above its last-stream-id, whatever its reason (a
    // grpc-go server's ENHANCE_YOUR_CALM included): they were not processed.
    if error.is_go_away() && error.is_remote() {
        return Outcome::Retry(RetryReason::GoAway(address));
    }
    if retry_lost && !error.is_reset() {
        let error = error.to_string();
        return Outcome::Retry(RetryReason::Lost { address, error });
    }
    let (message, broken) = if error.is_reset() {
        let reason = error.reason().unwrap_or(Reason::INTERNAL_ERROR);
        let message =
            format!("sluice: backend {address} reset the stream before replying ({reason:?})");
        (message, false)
    } else {
        (
            format!("sluice: connection to backend {address} failed: {error}"),
            true,
        )
    };
    Outcome::BackendFailed {
        status: ProxyStatus::unavailable(message),
        broken,
    }
}

/// The reason to pass upstream when the client side failed: its reset reason, else CANCEL
/// (the client's connection went away).
pub(super) fn client_reason(error: &h2::Error) -> Reason {
    if error.is_reset() {
        error.reason().unwrap_or(Reason::CANCEL)
    } else {
        Reason::CANCEL
    }
}
