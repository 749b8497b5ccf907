//! Piping one h2 stream into another: DATA with flow control, trailers, and resets.
//!
//! Two facts measured on the prototype shape this file (docs/architecture.md, "Facts about
//! `h2` that the engine depends on"):
//! - h2 (0.4.16+) closes a connection on the 101st empty DATA frame without END_STREAM, and
//!   tonic clients end every request with one. So empty chunks without END_STREAM are dropped,
//!   and END_STREAM rides on the last real chunk when it has already arrived behind it (else it
//!   goes alone, when it comes).
//! - `send_data` without reserved capacity buffers without limit. So capacity is reserved and
//!   awaited first, and the source's receive window is released only as bytes are forwarded:
//!   a slow reader slows its writer instead of filling the proxy's memory.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;

use bytes::Bytes;
use h2::{Reason, RecvStream};
use http::HeaderMap;

use crate::transport::leg::{self, Sink, Source};
use crate::wire::Code;

/// Why a pipe stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// The source stream failed: reset by its peer, or its connection broke.
    #[error("reading: {0}")]
    Source(h2::Error),
    /// The sink stream was reset by its peer (or closed under us) with this reason.
    #[error("writing: stream reset ({0:?})")]
    Sink(Reason),
}

/// How a request ended, so a retry can end the stream the same way.
#[derive(Debug, Clone)]
enum End {
    /// END_STREAM on a DATA frame.
    Data,
    /// Trailers, which carried END_STREAM. Boxed: request trailers are rare, and a bare
    /// `HeaderMap` would add 80 bytes to every call's future for its whole life.
    Trailers(Box<HeaderMap>),
}

/// What a pipe shows its observer as it forwards.
pub enum Seen<'a> {
    Data(&'a Bytes),
    Trailers(&'a HeaderMap),
}

/// Request DATA kept until the backend answers, so an attempt that never reached the backend's
/// application (REFUSED_STREAM, GOAWAY) can be replayed on another. Past `REPLAY_LIMIT` bytes,
/// or when the whole process already holds `REPLAY_HELD_LIMIT`, the call is no longer
/// retryable.
#[derive(Debug, Default)]
pub struct Replay {
    chunks: Vec<Bytes>,
    /// Request bytes read so far.
    bytes: usize,
    /// Bytes in `chunks`, counted in `REPLAY_HELD` until released.
    held: usize,
    overflowed: bool,
    end: Option<End>,
}

/// Covers unary and small streaming calls; bigger requests are not retried after their first
/// byte left. Bytes are shared with h2's receive buffer, not copied.
const REPLAY_LIMIT: usize = 256 * 1024;

/// Request bytes held for replay by all calls together. Flow control does not bound them
/// (capacity is released as bytes are forwarded), so without this cap many calls whose
/// backends are slow to answer could pin `calls × REPLAY_LIMIT` of memory.
static REPLAY_HELD: AtomicUsize = AtomicUsize::new(0);
const REPLAY_HELD_LIMIT: usize = 64 * 1024 * 1024;

impl Replay {
    /// True while everything the client sent so far is held, so a retry loses nothing.
    pub fn is_complete(&self) -> bool {
        !self.overflowed
    }

    /// True when no attempt has read anything of the request body yet.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.end.is_none()
    }

    fn record(&mut self, chunk: &Bytes) {
        if self.overflowed {
            return;
        }
        let len = chunk.len();
        self.bytes += len;
        let held_before = REPLAY_HELD.fetch_add(len, Ordering::Relaxed);
        if self.bytes > REPLAY_LIMIT || held_before + len > REPLAY_HELD_LIMIT {
            REPLAY_HELD.fetch_sub(len, Ordering::Relaxed);
            self.release();
        } else {
            self.held += len;
            self.chunks.push(chunk.clone());
        }
    }

    /// Frees the held chunks: the backend answered (no retry can follow), or a limit passed.
    pub fn release(&mut self) {
        REPLAY_HELD.fetch_sub(self.held, Ordering::Relaxed);
        self.held = 0;
        self.chunks = Vec::new();
        self.end = None;
        self.overflowed = true;
    }
}

/// A whole request body, shared with the replay that holds it: what a hedge sends.
#[derive(Debug, Default)]
pub struct HeldBody {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HeldBody {
    /// True when the request had no body at all: its headers end the stream.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }
}

impl Replay {
    /// The whole body, once the request has ended and every byte of it is held.
    pub fn whole_body(&self) -> Option<HeldBody> {
        let trailers = match (&self.end, self.overflowed) {
            (Some(End::Data), false) => None,
            (Some(End::Trailers(trailers)), false) => Some((**trailers).clone()),
            _ => return None,
        };
        Some(HeldBody {
            chunks: self.chunks.clone(),
            trailers,
        })
    }
}

/// Sends a held body and ends the stream.
pub async fn send_held(sink: &mut leg::SendStream, body: HeldBody) -> Result<(), PipeError> {
    for chunk in body.chunks {
        send_all(sink, chunk, false).await?;
    }
    match body.trailers {
        Some(trailers) => sink.send_trailers(trailers).map_err(sink_error),
        None => send_end(sink),
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        REPLAY_HELD.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// Forwards the downstream request body to the upstream stream, first replaying what earlier
/// attempts already read. Records into `replay` until `answered` is set (the backend sent its
/// response headers, so no retry can follow), then frees what it held.
///
/// Returns `replay` when the request has ended: the attempt frees it at the answer (or at once,
/// if the answer came first), so a request that ends before the answer (a unary call, a server
/// stream's request) is not held for the call's whole life.
pub async fn upload<'r>(
    source: &mut RecvStream,
    sink: &mut leg::SendStream,
    replay: &'r mut Replay,
    answered: &AtomicBool,
    received: &AtomicU64,
) -> Result<&'r mut Replay, PipeError> {
    send_body(source, sink, replay, answered, received).await?;
    Ok(replay)
}

async fn send_body(
    source: &mut RecvStream,
    sink: &mut leg::SendStream,
    replay: &mut Replay,
    answered: &AtomicBool,
    received: &AtomicU64,
) -> Result<(), PipeError> {
    if !replay.chunks.is_empty() || replay.end.is_some() {
        for chunk in replay.chunks.clone() {
            send_all(sink, chunk, false).await?;
        }
        match replay.end.clone() {
            Some(End::Data) => return send_end(sink),
            Some(End::Trailers(trailers)) => {
                return sink.send_trailers(*trailers).map_err(sink_error)
            }
            None => {}
        }
    }
    let _request_status = pipe(source, sink, |seen| {
        if let Seen::Data(chunk) = seen {
            received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if answered.load(Ordering::Relaxed) {
            if !replay.overflowed {
                replay.release();
            }
            return;
        }
        match seen {
            Seen::Data(chunk) => replay.record(chunk),
            // Request trailers are rare in gRPC; they are copied only while a retry may follow.
            Seen::Trailers(trailers) if !replay.overflowed => {
                replay.end = Some(End::Trailers(Box::new(trailers.clone())));
            }
            Seen::Trailers(_) => {}
        }
    })
    .await?;
    if !replay.overflowed && replay.end.is_none() {
        replay.end = Some(End::Data);
    }
    Ok(())
}

/// Forwards DATA and trailers from `source` to `sink` until the source ends, showing each to
/// `observe` first. Notices a reset of the sink while it waits on the source. Returns the
/// `grpc-status` of the trailers: `None` when the stream ended without trailers (END_STREAM on
/// DATA), `Some(Unknown)` for trailers without a valid status.
pub async fn pipe<S: Source, K: Sink>(
    source: &mut S,
    sink: &mut K,
    mut observe: impl FnMut(Seen<'_>),
) -> Result<Option<Code>, PipeError> {
    enum Event {
        Data(Option<Result<Bytes, h2::Error>>),
        SinkReset(Result<Reason, h2::Error>),
    }
    // An event read ahead of its turn (see `end_arrived`), already shown to `observe`.
    let mut read_ahead = None;
    loop {
        let (event, observed) = match read_ahead.take() {
            Some(data) => (Event::Data(data), true),
            None => {
                let event = poll_fn(|cx| {
                    if let Poll::Ready(reset) = sink.poll_reset(cx) {
                        return Poll::Ready(Event::SinkReset(reset));
                    }
                    source.poll_data(cx).map(Event::Data)
                });
                (event.await, false)
            }
        };
        match event {
            Event::SinkReset(Ok(reason)) => return Err(PipeError::Sink(reason)),
            Event::SinkReset(Err(e)) => return Err(sink_error(e)),
            Event::Data(Some(Ok(chunk))) => {
                let len = chunk.len();
                let end = source.is_end_stream();
                if len == 0 {
                    // Empty DATA: forward only the END_STREAM it may carry.
                    if end {
                        return send_end(sink).map(|()| None);
                    }
                    continue;
                }
                if !observed {
                    observe(Seen::Data(&chunk));
                }
                let end = end || end_arrived(source, &mut read_ahead, &mut observe).await;
                send_all(sink, chunk, end).await?;
                // Forwarded: now the source may send that much more.
                source.release_capacity(len);
                if end {
                    return Ok(None);
                }
            }
            Event::Data(Some(Err(e))) => return Err(PipeError::Source(e)),
            Event::Data(None) => {
                let trailers = poll_fn(|cx| source.poll_trailers(cx))
                    .await
                    .map_err(PipeError::Source)?;
                return match trailers {
                    Some(trailers) => {
                        observe(Seen::Trailers(&trailers));
                        let status = Code::of_headers(&trailers);
                        sink.send_trailers(trailers).map_err(sink_error)?;
                        Ok(Some(status))
                    }
                    None => send_end(sink).map(|()| None),
                };
            }
        }
    }
}

/// Whether the source's END_STREAM has already arrived, in an empty DATA frame right behind
/// the chunk just read (how tonic and grpc-go clients end a request). Then the chunk carries
/// END_STREAM itself: one frame fewer, and no empty DATA frame trailing the message in the
/// same packet, which makes a tonic 0.14 backend wait for its next packet before it answers.
/// Never waits: whatever else is ready is kept in `read_ahead` for the next turn, and data is
/// shown to `observe` at once, so a replay holds it even if the pipe stops before its turn
/// (the sink reset, or the attempt ended and a retry follows).
async fn end_arrived<S: Source>(
    source: &mut S,
    read_ahead: &mut Option<Option<Result<Bytes, h2::Error>>>,
    observe: &mut impl FnMut(Seen<'_>),
) -> bool {
    match poll_fn(|cx| Poll::Ready(source.poll_data(cx))).await {
        Poll::Ready(Some(Ok(empty))) if empty.is_empty() && source.is_end_stream() => true,
        Poll::Ready(next) => {
            if let Some(Ok(data)) = &next {
                if !data.is_empty() {
                    observe(Seen::Data(data));
                }
            }
            *read_ahead = Some(next);
            false
        }
        Poll::Pending => false,
    }
}

/// Sends one chunk as the peer's flow-control window allows, END_STREAM on its last piece.
pub(super) async fn send_all<K: Sink>(
    sink: &mut K,
    mut chunk: Bytes,
    end: bool,
) -> Result<(), PipeError> {
    loop {
        sink.reserve_capacity(chunk.len());
        let granted = match poll_fn(|cx| sink.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(sink_error(e)),
            None => return Err(PipeError::Sink(Reason::CANCEL)),
        };
        if granted == 0 {
            continue;
        }
        let piece = chunk.split_to(granted.min(chunk.len()));
        let last = chunk.is_empty();
        sink.send_data(piece, end && last).map_err(sink_error)?;
        if last {
            return Ok(());
        }
    }
}

fn send_end<K: Sink>(sink: &mut K) -> Result<(), PipeError> {
    sink.send_data(Bytes::new(), true).map_err(sink_error)
}

fn sink_error(e: h2::Error) -> PipeError {
    PipeError::Sink(e.reason().unwrap_or(Reason::CANCEL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_holds_up_to_its_limit_and_returns_what_it_held() {
        // Other tests in this process may hold replay bytes too: compare deltas only.
        let before = REPLAY_HELD.load(Ordering::Relaxed);
        let chunk = Bytes::from(vec![7u8; 100 * 1024]);
        let mut replay = Replay::default();
        assert!(replay.is_empty());
        replay.record(&chunk);
        replay.record(&chunk);
        assert!(replay.is_complete() && !replay.is_empty());
        assert_eq!(REPLAY_HELD.load(Ordering::Relaxed) - before, 200 * 1024);
        replay.record(&chunk); // 300 KiB > REPLAY_LIMIT: no longer retryable
        assert!(!replay.is_complete());
        assert!(replay.chunks.is_empty());
        assert_eq!(REPLAY_HELD.load(Ordering::Relaxed), before);

        let mut held = Replay::default();
        held.record(&chunk);
        drop(held);
        assert_eq!(REPLAY_HELD.load(Ordering::Relaxed), before);
    }
}
