//! W3C trace context and the spans of one call: a server span for the call, a client span per
//! attempt. A call's spans are kept in memory while it runs and handed, when it ends, to the
//! exporter (`otlp.rs`) over a bounded queue: a full queue drops them and counts it, so a slow
//! collector never costs a call any time.
//!
//! Sampling is parent-based: a call whose `traceparent` carries the sampled flag is traced,
//! one that carries it unset is not, and one that starts a trace is sampled at the configured
//! ratio. A call that ends in any status but OK is exported whatever the decision.

use std::net::SocketAddr;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::wire::{Code, Origin};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A span's 8-byte id; never all zero.
pub type SpanId = [u8; 8];
/// A trace's 16-byte id; never all zero.
pub type TraceId = [u8; 16];

/// What a `traceparent` header says: `00-<trace id>-<parent span id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl Parent {
    /// Parses a `traceparent` value. Versions other than 00 are read as 00 (the W3C rule for
    /// a version this reader does not know), except the invalid ff; all-zero ids are invalid.
    pub fn parse(value: &[u8]) -> Option<Parent> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let mut fields = text.split('-');
        let (version, trace, span, flags) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let known_length = version != "00" || fields.next().is_none();
        if version.len() != 2 || version == "ff" || !known_length || flags.len() != 2 {
            return None;
        }
        u8::from_str_radix(version, 16).ok()?;
        let trace_id: TraceId = hex_bytes(trace)?;
        let span_id: SpanId = hex_bytes(span)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        if zero(&trace_id) || zero(&span_id) {
            return None;
        }
        Some(Parent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

/// Lowercase hex of exactly `N` bytes.
fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let nibble = |d: u8| match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            _ => None,
        };
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// `00-<trace id>-<span id>-<flags>`, for the request sent upstream. Marked sensitive, so
/// HPACK never indexes it: each value is new, and indexing one costs a table insert and an
/// eviction for nothing (callgrind: about 2,800 instructions a call).
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> HeaderValue {
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(trace_id, &mut text[3..35]);
    hex_into(span_id, &mut text[36..52]);
    if sampled {
        text[54] = b'1';
    }
    // Only hex digits and dashes: always a valid header value.
    let mut value = HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// Lowercase hex of `bytes`, into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Nanoseconds since the Unix epoch at `at`, from the wall clock read once per process and
/// the monotonic clock since: one clock read per call, not two.
fn unix_ns(at: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (base, base_unix_ns) = BASE.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), unix.as_nanos() as u64)
    });
    let since = at.saturating_duration_since(*base).as_nanos() as u64;
    base_unix_ns.saturating_add(since)
}

fn new_span_id() -> SpanId {
    fastrand::u64(1..).to_be_bytes()
}

fn new_trace_id() -> TraceId {
    fastrand::u128(1..).to_be_bytes()
}

/// Why an attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    First,
    /// After an earlier attempt failed in a way that may be retried.
    Retry,
    /// Beside an earlier attempt still waiting for its answer.
    Hedge,
}

impl AttemptKind {
    pub fn label(self) -> &'static str {
        match self {
            AttemptKind::First => "first",
            AttemptKind::Retry => "retry",
            AttemptKind::Hedge => "hedge",
        }
    }
}

/// One attempt's client span.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    pub span_id: SpanId,
    pub backend: String,
    pub kind: AttemptKind,
    /// How long the call waited in the cluster's queue for this attempt's backend.
    pub queue_wait: Duration,
    pub started: Instant,
    pub ended: Option<Instant>,
    /// The status it ended with; `None` while it runs.
    pub code: Option<Code>,
    /// Another attempt answered first, and this one was cancelled.
    pub cancelled_by_hedge: bool,
}

impl AttemptSpan {
    /// A new attempt's span, open from now, with a fresh id.
    pub fn open(backend: &str, kind: AttemptKind, queue_wait: Duration) -> AttemptSpan {
        AttemptSpan {
            span_id: new_span_id(),
            backend: backend.to_string(),
            kind,
            queue_wait,
            started: Instant::now(),
            ended: None,
            code: None,
            cancelled_by_hedge: false,
        }
    }

    /// Ends the span now, with `code`.
    pub fn close(&mut self, code: Code, cancelled_by_hedge: bool) {
        self.ended = Some(Instant::now());
        self.code = Some(code);
        self.cancelled_by_hedge = cancelled_by_hedge;
    }
}

/// Closes the last span in `spans` still open on `backend`, with `code`.
pub fn close_open(spans: &mut [AttemptSpan], backend: &str, code: Code, cancelled_by_hedge: bool) {
    let open = (spans.iter_mut().rev()).find(|s| s.ended.is_none() && s.backend == backend);
    if let Some(span) = open {
        span.close(code, cancelled_by_hedge);
    }
}

/// A call's trace while it runs: its ids, the sampling decision, and its attempts.
#[derive(Debug)]
pub struct CallTrace {
    pub trace_id: TraceId,
    /// The server span's id: the parent of every attempt span.
    pub span_id: SpanId,
    /// The client's span, when the call came with a `traceparent`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub started: Instant,
    pub started_unix_ns: u64,
    pub attempts: Vec<AttemptSpan>,
}

impl CallTrace {
    /// Opens the span of a new attempt (its `traceparent` is `latest_traceparent`).
    pub fn begin_attempt(&mut self, backend: &str, kind: AttemptKind, queue_wait: Duration) {
        self.attempts
            .push(AttemptSpan::open(backend, kind, queue_wait));
    }

    /// The `traceparent` of the latest attempt: its span is the backend's parent.
    pub fn latest_traceparent(&self) -> Option<HeaderValue> {
        let latest = self.attempts.last()?;
        Some(traceparent(&self.trace_id, &latest.span_id, self.sampled))
    }

    /// Closes the span of the attempt on `backend` still open (the last such), with `code`.
    pub fn end_attempt(&mut self, backend: &str, code: Code, cancelled_by_hedge: bool) {
        close_open(&mut self.attempts, backend, code, cancelled_by_hedge);
    }

    /// Nanoseconds since the Unix epoch at `at`, on the clock read when the call began.
    pub fn unix_ns(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.started).as_nanos() as u64;
        self.started_unix_ns.saturating_add(since)
    }
}

/// A finished call, with what its server span says of it.
#[derive(Debug)]
pub struct FinishedCall {
    pub trace: Box<CallTrace>,
    pub path: String,
    pub code: Code,
    pub origin: Origin,
    pub listener: String,
    pub cluster: Option<String>,
    pub peer: Option<SocketAddr>,
    pub rejected: Option<&'static str>,
    pub ended: Instant,
}

/// Makes each call's trace, and queues finished calls for export.
#[derive(Debug)]
pub struct Tracer {
    ratio: f64,
    queue: SyncSender<FinishedCall>,
    /// `sluice_trace_spans_dropped_total{reason="queue_full"}`.
    dropped: prometheus::IntCounter,
}

impl Tracer {
    pub fn new(
        ratio: f64,
        queue: SyncSender<FinishedCall>,
        dropped: prometheus::IntCounter,
    ) -> Self {
        Tracer {
            ratio,
            queue,
            dropped,
        }
    }

    /// Begins a call's trace from its `traceparent`, or a new trace when it has none (or an
    /// invalid one).
    pub fn begin(&self, headers: &HeaderMap) -> Box<CallTrace> {
        let parent = (headers.get(TRACEPARENT)).and_then(|v| Parent::parse(v.as_bytes()));
        let span_id = new_span_id();
        let (trace_id, parent_span, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.sampled),
            None => {
                let trace_id = new_trace_id();
                (trace_id, None, self.samples(&trace_id))
            }
        };
        let started = Instant::now();
        Box::new(CallTrace {
            trace_id,
            span_id,
            parent: parent_span,
            sampled,
            started,
            started_unix_ns: unix_ns(started),
            attempts: Vec::new(),
        })
    }

    /// The ratio sampler's decision for a new trace, from its id's random low 64 bits (as
    /// OpenTelemetry's trace-id ratio sampler decides): no second random draw per call.
    fn samples(&self, trace_id: &TraceId) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        self.ratio >= 1.0 || (u64::from_be_bytes(low) as f64) < self.ratio * (u64::MAX as f64)
    }

    /// Whether a call that ended with `code` is exported: it was sampled, or it failed.
    pub fn keeps(trace: &CallTrace, code: Code) -> bool {
        trace.sampled || code != Code::Ok
    }

    /// Queues a finished call for export (one that `keeps`); drops and counts it when the
    /// queue is full.
    pub fn finish(&self, call: FinishedCall) {
        if let Err(TrySendError::Full(call)) = self.queue.try_send(call) {
            self.dropped.inc_by(1 + call.trace.attempts.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_traces_are_sampled_at_the_ratio_and_parents_decide_for_theirs() {
        let (queue, _finished) = std::sync::mpsc::sync_channel(1);
        let counter = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let tracer = Tracer::new(0.1, queue, counter);
        let mut headers = HeaderMap::new();
        let sampled = (0..10_000)
            .filter(|_| tracer.begin(&headers).sampled)
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 10,000");
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(TRACEPARENT, HeaderValue::from_static(parent));
        assert!((0..100).all(|_| tracer.begin(&headers).sampled));
        let all = Tracer::new(
            1.0,
            std::sync::mpsc::sync_channel(1).0,
            tracer.dropped.clone(),
        );
        assert!((0..1000).all(|_| all.begin(&HeaderMap::new()).sampled));
    }

    #[test]
    fn traceparent_round_trips_and_rejects_what_w3c_rejects() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = Parent::parse(value.as_bytes()).unwrap();
        assert!(parent.sampled);
        let again = traceparent(&parent.trace_id, &parent.span_id, parent.sampled);
        assert_eq!(again.to_str().unwrap(), value);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!Parent::parse(unsampled.as_bytes()).unwrap().sampled);
        // A later version may carry more fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(Parent::parse(future.as_bytes()).is_some());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(Parent::parse(bad.as_bytes()), None, "{bad}");
        }
    }
}
