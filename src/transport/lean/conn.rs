//! The task side of an upstream connection: reads the socket and hands each frame to the
//! shared state, and writes what the calls queued, all of it in one `writev` when it can.
//! One task per connection drives every stream on it; a call's task is woken only for its
//! own stream's events.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite};

use super::decode::Decoder;
use super::frame::{self, Head};
use super::state::{Failure, State};
use super::Shared;
use crate::sync::lock;

/// Reads per poll before the task yields to others (it wakes itself to go on).
const READS_PER_POLL: usize = 16;
/// The read buffer grows by this much at a time: one full frame and its header.
const READ_CHUNK: usize = 16 * 1024 + 9;
/// The largest header block (HEADERS plus CONTINUATIONs) a backend may send.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The most buffers one `writev` takes.
const MAX_IOVECS: usize = 64;

/// A header block still waiting for its CONTINUATION frames.
struct Partial {
    stream: u32,
    end_stream: bool,
    block: BytesMut,
}

/// The connection's task. Resolves when the connection is over: closed by the backend,
/// failed, or no longer needed (every sender and stream gone).
pub struct Connection<T> {
    shared: Arc<Shared>,
    io: T,
    read_buf: BytesMut,
    decoder: Decoder,
    partial: Option<Partial>,
    /// The GOAWAY that ends an unused connection went out.
    closing: bool,
}

impl<T> Connection<T> {
    pub(super) fn new(shared: Arc<Shared>, io: T) -> Self {
        Connection {
            shared,
            io,
            read_buf: BytesMut::new(),
            decoder: Decoder::default(),
            partial: None,
            closing: false,
        }
    }

    /// The backend's SETTINGS_MAX_CONCURRENT_STREAMS (unbounded until it says).
    pub fn max_concurrent_send_streams(&self) -> usize {
        lock(&self.shared.state).peer_max_streams
    }

    /// The keepalive PING, for the connection's driver.
    pub fn ping_pong(&mut self) -> Option<super::PingPong> {
        Some(super::PingPong {
            shared: Arc::clone(&self.shared),
        })
    }
}

impl<T> Drop for Connection<T> {
    fn drop(&mut self) {
        // The task ended (closed, idle, a PING unanswered): streams still open fail.
        lock(&self.shared.state).fail(Failure::Io(std::io::ErrorKind::BrokenPipe));
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Connection<T> {
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = lock(&this.shared.state);
        state.task_polled(cx.waker());
        let mut reads = 0;
        while state.failure.is_none() {
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                break;
            }
            if this.read_buf.capacity() - this.read_buf.len() < READ_CHUNK / 4 {
                this.read_buf.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.read_buf) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => state.fail(Failure::Io(std::io::ErrorKind::UnexpectedEof)),
                Poll::Ready(Ok(_)) => {
                    reads += 1;
                    let frames = Frames {
                        read_buf: &mut this.read_buf,
                        decoder: &mut this.decoder,
                        partial: &mut this.partial,
                    };
                    frames.read_all(&mut state);
                }
                Poll::Ready(Err(error)) => state.fail(Failure::Io(error.kind())),
            }
        }
        if state.senders_gone && !state.has_streams() && state.failure.is_none() && !this.closing {
            // Nobody can open a stream on it any more: say so, and close.
            this.closing = true;
            frame::put_goaway(state.out.buf(), 0, Reason::NO_ERROR.into());
        }
        let written = match write(&mut this.io, &mut state, cx) {
            Poll::Ready(Err(error)) => {
                state.fail(Failure::Io(error.kind()));
                true
            }
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
        };
        let flushed = state.out.is_empty();
        match state.failure {
            Some(Failure::Io(_)) => Poll::Ready(Err(state.failure_error())),
            Some(_) if flushed || written => Poll::Ready(Err(state.failure_error())),
            None if this.closing && flushed => Poll::Ready(Ok(())),
            None if state.going_away.is_some() && !state.has_streams() => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }
}

impl State {
    fn failure_error(&self) -> h2::Error {
        self.failure
            .unwrap_or(Failure::Io(std::io::ErrorKind::BrokenPipe))
            .error(0)
    }
}

/// Writes what is queued until the socket would block. `Ready(Ok)` when all went out.
fn write<T: AsyncWrite + Unpin>(
    io: &mut T,
    state: &mut State,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    let mut wrote = false;
    while !state.out.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = state.out.slices(&mut slices);
        match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(written)) => {
                state.out.advance(written);
                wrote = true;
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        }
    }
    if wrote {
        // TLS holds records until flushed; TCP's flush does nothing.
        std::task::ready!(Pin::new(&mut *io).poll_flush(cx))?;
    }
    Poll::Ready(Ok(()))
}

/// The read side's parser: whole frames out of the read buffer, header blocks decoded.
struct Frames<'a> {
    read_buf: &'a mut BytesMut,
    decoder: &'a mut Decoder,
    partial: &'a mut Option<Partial>,
}

impl Frames<'_> {
    fn read_all(self, state: &mut State) {
        let Frames {
            read_buf,
            decoder,
            partial,
        } = self;
        while state.failure.is_none() && read_buf.len() >= frame::HEADER_LEN {
            let head = Head::parse(read_buf);
            if head.len > state.max_frame() {
                return state.connection_error(Reason::FRAME_SIZE_ERROR);
            }
            if read_buf.len() < frame::HEADER_LEN + head.len {
                read_buf.reserve(frame::HEADER_LEN + head.len - read_buf.len());
                return;
            }
            read_buf.advance(frame::HEADER_LEN);
            let payload = read_buf.split_to(head.len);
            match partial.take() {
                Some(waiting) => continuation(state, decoder, partial, waiting, head, payload),
                None => one_frame(state, decoder, partial, head, payload),
            }
        }
    }
}

fn one_frame(
    state: &mut State,
    decoder: &mut Decoder,
    partial: &mut Option<Partial>,
    head: Head,
    payload: BytesMut,
) {
    let on_stream = head.stream != 0;
    match head.kind {
        frame::DATA if on_stream => state.on_data(head, payload),
        frame::HEADERS if on_stream => headers(state, decoder, partial, head, payload),
        frame::PRIORITY if on_stream && head.len == 5 => {}
        frame::RST_STREAM if on_stream && head.len == 4 => {
            let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            state.on_rst_stream(head.stream, code.into());
        }
        frame::SETTINGS if !on_stream && head.flags & frame::ACK != 0 && head.len == 0 => {}
        frame::SETTINGS
            if !on_stream && head.flags & frame::ACK == 0 && head.len.is_multiple_of(6) =>
        {
            state.on_settings(&payload)
        }
        frame::PING if !on_stream && head.len == 8 => {
            let mut data = [0; 8];
            data.copy_from_slice(&payload);
            state.on_ping(head.flags & frame::ACK != 0, data);
        }
        frame::GOAWAY if !on_stream && head.len >= 8 => {
            let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            state.on_goaway(last & 0x7fff_ffff, code.into());
        }
        frame::WINDOW_UPDATE if head.len == 4 => {
            let increment = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            state.on_window_update(head.stream, increment & 0x7fff_ffff);
        }
        frame::PRIORITY
        | frame::RST_STREAM
        | frame::SETTINGS
        | frame::PING
        | frame::GOAWAY
        | frame::WINDOW_UPDATE => {
            let reason = match (head.kind, on_stream) {
                (frame::RST_STREAM | frame::PRIORITY, true) => Reason::FRAME_SIZE_ERROR,
                (frame::RST_STREAM | frame::PRIORITY, false) => Reason::PROTOCOL_ERROR,
                (_, true) if head.kind != frame::WINDOW_UPDATE => Reason::PROTOCOL_ERROR,
                _ => Reason::FRAME_SIZE_ERROR,
            };
            state.connection_error(reason);
        }
        // DATA or HEADERS on stream 0, a push (we disabled it), CONTINUATION out of place.
        frame::DATA | frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION => {
            state.connection_error(Reason::PROTOCOL_ERROR)
        }
        // Unknown frame types are ignored (RFC 9113 §4.1).
        _ => {}
    }
}

/// A HEADERS frame: decoded now if it ends its block, else kept for its CONTINUATIONs.
fn headers(
    state: &mut State,
    decoder: &mut Decoder,
    partial: &mut Option<Partial>,
    head: Head,
    mut payload: BytesMut,
) {
    let Some((mut start, end)) = frame::unpad(&payload, head.flags) else {
        return state.connection_error(Reason::PROTOCOL_ERROR);
    };
    if head.flags & frame::PRIORITY_FLAG != 0 {
        start += 5;
        if start > end {
            return state.connection_error(Reason::PROTOCOL_ERROR);
        }
    }
    payload.truncate(end);
    payload.advance(start);
    let end_stream = head.flags & frame::END_STREAM != 0;
    if head.flags & frame::END_HEADERS == 0 {
        *partial = Some(Partial {
            stream: head.stream,
            end_stream,
            block: payload,
        });
        return;
    }
    block_done(state, decoder, head.stream, end_stream, payload);
}

fn continuation(
    state: &mut State,
    decoder: &mut Decoder,
    partial: &mut Option<Partial>,
    mut waiting: Partial,
    head: Head,
    payload: BytesMut,
) {
    if head.kind != frame::CONTINUATION || head.stream != waiting.stream {
        return state.connection_error(Reason::PROTOCOL_ERROR);
    }
    waiting.block.extend_from_slice(&payload);
    if waiting.block.len() > MAX_HEADER_BLOCK {
        return state.connection_error(Reason::ENHANCE_YOUR_CALM);
    }
    if head.flags & frame::END_HEADERS == 0 {
        *partial = Some(waiting);
        return;
    }
    block_done(
        state,
        decoder,
        waiting.stream,
        waiting.end_stream,
        waiting.block,
    );
}

/// A whole header block: decoded (always, to keep the decoder's table in step with the
/// backend's encoder), then handed to its stream.
fn block_done(state: &mut State, decoder: &mut Decoder, id: u32, end: bool, mut block: BytesMut) {
    match decoder.decode(&mut block) {
        Some(decoded) => state.on_headers(id, end, decoded),
        None => state.connection_error(Reason::COMPRESSION_ERROR),
    }
}
