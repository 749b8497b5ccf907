//! The state one upstream connection shares between its task (which reads and writes the
//! socket) and the calls' stream handles: the streams by id, both directions' flow-control
//! windows, and the bytes waiting to be written. Everything here runs under the connection's
//! lock and never blocks; whoever changes what another side waits for wakes it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::task::Waker;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{proxying, Reason};
use http::HeaderMap;

use super::frame::{self, DEFAULT_WINDOW, MAX_WINDOW};
use super::output::Output;

/// Why a stream (or the whole connection) failed. Kept as a value, because `h2::Error` is not
/// `Clone` and every poll after the failure must report it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend reset the stream.
    RemoteReset(Reason),
    /// sluice reset it: the caller did, or the backend broke the protocol on it.
    LocalReset(Reason),
    /// The backend's GOAWAY: this stream was above its last stream id, or, for the
    /// connection, no new stream may start.
    RemoteGoAway(Reason),
    /// sluice closed the connection: the backend broke the protocol.
    LocalGoAway(Reason),
    /// The socket failed or the backend closed it; or the connection's task ended.
    Io(std::io::ErrorKind),
}

impl Failure {
    pub fn error(self, stream: u32) -> h2::Error {
        match self {
            Failure::RemoteReset(reason) => proxying::remote_reset(stream, reason),
            Failure::LocalReset(reason) => proxying::library_reset(stream, reason),
            Failure::RemoteGoAway(reason) => proxying::remote_go_away(reason),
            Failure::LocalGoAway(reason) => proxying::library_go_away(reason),
            Failure::Io(kind) => {
                let what = match kind {
                    std::io::ErrorKind::UnexpectedEof => "the backend closed the connection",
                    std::io::ErrorKind::BrokenPipe => "the connection to the backend was closed",
                    _ => "the connection to the backend failed",
                };
                proxying::io(std::io::Error::new(kind, what))
            }
        }
    }

    /// The reason a reset carries, for `poll_reset`.
    fn reset_reason(self) -> Option<Reason> {
        match self {
            Failure::RemoteReset(reason) | Failure::LocalReset(reason) => Some(reason),
            _ => None,
        }
    }
}

/// One stream's state.
#[derive(Debug)]
pub struct Stream {
    /// What we may still send: the peer's window for this stream.
    send_window: i64,
    /// Capacity handed to the caller by `poll_capacity` and not yet sent; already taken out
    /// of both send windows.
    granted: usize,
    /// What the peer may still send us on this stream.
    recv_window: i64,
    /// Bytes the caller has consumed and we have not yet given back in a WINDOW_UPDATE.
    unreleased: i64,
    /// The response head, until its future takes it. Boxed, like `trailers`: held only
    /// briefly, and a held stream (a long server stream) should not carry their size.
    pub response: Option<Box<http::response::Parts>>,
    got_headers: bool,
    pub data: VecDeque<Bytes>,
    /// Bytes received and not yet released by the caller (queued in `data`, or taken and
    /// not yet forwarded): given back to the connection window when the stream goes.
    pub unreleased_data: usize,
    pub trailers: Option<Box<HeaderMap>>,
    /// END_STREAM came from the backend (on DATA or trailers).
    pub recv_ended: bool,
    /// We sent END_STREAM.
    send_ended: bool,
    pub failure: Option<Failure>,
    recv_waker: Option<Waker>,
    send_waker: Option<Waker>,
    /// Handles alive: the response future (then the body), and the send half.
    handles: u8,
}

/// Stream ids are odd numbers handed out in order: spread them for hashbrown's control bits.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8 | u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Settings sluice asks of its backends, and the windows it opens.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
}

/// The connection's shared state.
#[derive(Debug)]
pub struct State {
    streams: HashMap<u32, Stream, BuildHasherDefault<IdHasher>>,
    next_id: u32,
    pub out: Output,
    /// The connection task: woken when there is something to write or a stream let go.
    conn_waker: Option<Waker>,
    /// Set when the task was woken and has not run since: the next writer need not wake it.
    write_scheduled: bool,
    local: Local,
    /// The connection-level window we may still send into.
    send_window: i64,
    /// The backend's SETTINGS.
    peer_initial_window: i64,
    peer_max_frame: usize,
    pub peer_max_streams: usize,
    /// What the backend may still send on the connection, and what the calls consumed and
    /// we have not given back yet.
    recv_window: i64,
    unreleased: i64,
    /// The connection failed: no new stream, and every open one fails with this.
    pub failure: Option<Failure>,
    /// The backend's GOAWAY: the last stream id it will process, and its reason.
    pub going_away: Option<(u32, Reason)>,
    /// Every `Sender` is gone: the connection closes once its streams are done.
    pub senders_gone: bool,
    /// A keepalive PING is out; set back to false by its ACK.
    pub ping_out: bool,
    pub pong: bool,
}

/// The payload of sluice's keepalive PING.
pub const PING_PAYLOAD: [u8; 8] = *b"sluice\0\x01";

impl State {
    pub fn new(local: Local) -> State {
        let mut out = Output::default();
        let buf = out.buf();
        buf.put_slice(frame::PREFACE);
        let mut settings = vec![
            (frame::SETTINGS_ENABLE_PUSH, 0),
            (frame::SETTINGS_INITIAL_WINDOW_SIZE, local.stream_window),
        ];
        if local.max_frame_size != 16_384 {
            settings.push((frame::SETTINGS_MAX_FRAME_SIZE, local.max_frame_size));
        }
        frame::put_settings(buf, &settings);
        let extra = i64::from(local.connection_window) - DEFAULT_WINDOW;
        if extra > 0 {
            frame::put_window_update(buf, 0, extra as u32);
        }
        State {
            streams: HashMap::default(),
            next_id: 1,
            out,
            conn_waker: None,
            write_scheduled: false,
            local,
            send_window: DEFAULT_WINDOW,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: 16_384,
            peer_max_streams: usize::MAX,
            recv_window: DEFAULT_WINDOW.max(i64::from(local.connection_window)),
            unreleased: 0,
            failure: None,
            going_away: None,
            senders_gone: false,
            ping_out: false,
            pong: false,
        }
    }

    /// Skips ahead to stream id `id`, for a test of what happens when ids run out.
    #[cfg(test)]
    pub fn skip_to_id(&mut self, id: u32) {
        self.next_id = id;
    }

    pub fn max_frame(&self) -> usize {
        self.local.max_frame_size as usize
    }

    pub fn has_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Registers the connection task's waker; it is about to run.
    pub fn task_polled(&mut self, waker: &Waker) {
        self.write_scheduled = false;
        if !self.conn_waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.conn_waker = Some(waker.clone());
        }
    }

    /// Something was queued to write, or the task has something to notice.
    pub fn wake_task(&mut self) {
        if !self.write_scheduled {
            self.write_scheduled = true;
            if let Some(waker) = &self.conn_waker {
                waker.wake_by_ref();
            }
        }
    }

    // ===== what the calls do =====

    /// Opens a stream whose request header block the caller writes with `encode`; `end`: the
    /// request has no body.
    pub fn open(
        &mut self,
        end: bool,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<u32, h2::Error> {
        if let Some(failure) = self.failure {
            return Err(failure.error(0));
        }
        if let Some((_, reason)) = self.going_away {
            return Err(Failure::RemoteGoAway(reason).error(0));
        }
        let id = self.next_id;
        if id > MAX_WINDOW as u32 {
            // Stream ids are used up (2^30 streams): no new stream here, and the connection
            // closes once its last stream ends, as after a GOAWAY.
            self.going_away.get_or_insert((id - 2, Reason::NO_ERROR));
            return Err(Failure::LocalGoAway(Reason::NO_ERROR).error(0));
        }
        self.next_id += 2;
        let flags = if end { frame::END_STREAM } else { 0 };
        self.put_header_block(id, flags, encode);
        self.streams.insert(
            id,
            Stream {
                send_window: self.peer_initial_window,
                granted: 0,
                recv_window: i64::from(self.local.stream_window),
                unreleased: 0,
                response: None,
                got_headers: false,
                data: VecDeque::new(),
                unreleased_data: 0,
                trailers: None,
                recv_ended: false,
                send_ended: end,
                failure: None,
                recv_waker: None,
                send_waker: None,
                handles: 2,
            },
        );
        self.wake_task();
        Ok(id)
    }

    /// Writes a HEADERS frame (and CONTINUATIONs, past the backend's frame size) whose block
    /// `encode` writes in place.
    fn put_header_block(&mut self, id: u32, flags: u8, encode: impl FnOnce(&mut BytesMut)) {
        let max = self.peer_max_frame;
        let buf = self.out.buf();
        let start = buf.len();
        buf.put_bytes(0, frame::HEADER_LEN);
        encode(buf);
        let len = buf.len() - start - frame::HEADER_LEN;
        if len <= max {
            let head = &mut buf[start..start + frame::HEADER_LEN];
            head[..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
            head[3] = frame::HEADERS;
            head[4] = flags | frame::END_HEADERS;
            head[5..].copy_from_slice(&id.to_be_bytes());
            return;
        }
        let mut block = buf.split_off(start + frame::HEADER_LEN);
        buf.truncate(start);
        let mut kind = frame::HEADERS;
        let mut first_flags = flags;
        while !block.is_empty() {
            let piece = block.split_to(block.len().min(max));
            let last = if block.is_empty() {
                frame::END_HEADERS
            } else {
                0
            };
            frame::put_head(buf, piece.len(), kind, first_flags | last, id);
            buf.put_slice(&piece);
            kind = frame::CONTINUATION;
            first_flags = 0;
        }
    }

    pub fn stream(&mut self, id: u32) -> Option<&mut Stream> {
        self.streams.get_mut(&id)
    }

    /// Capacity to send on stream `id`: `Some(n)` with n > 0, or `None` after registering
    /// `waker` (the windows are closed). A failed stream answers its error.
    pub fn poll_capacity(
        &mut self,
        id: u32,
        wanted: usize,
        waker: &Waker,
    ) -> Option<Result<usize, h2::Error>> {
        let conn_window = self.send_window;
        let Some(stream) = self.streams.get_mut(&id) else {
            return Some(Err(closed_stream()));
        };
        if let Some(failure) = stream.failure {
            return Some(Err(failure.error(id)));
        }
        if stream.granted > 0 {
            return Some(Ok(stream.granted));
        }
        let grant = (wanted as i64).min(stream.send_window).min(conn_window);
        if grant <= 0 {
            set_waker(&mut stream.send_waker, waker);
            return None;
        }
        stream.send_window -= grant;
        stream.granted = grant as usize;
        self.send_window -= grant;
        Some(Ok(grant as usize))
    }

    /// Queues DATA on stream `id`, split at the backend's frame size.
    pub fn send_data(&mut self, id: u32, mut data: Bytes, end: bool) -> Result<(), h2::Error> {
        let max = self.peer_max_frame;
        let stream = self.streams.get_mut(&id).ok_or_else(closed_stream)?;
        if let Some(failure) = stream.failure {
            return Err(failure.error(id));
        }
        if stream.send_ended {
            return Err(closed_stream());
        }
        stream.granted = stream.granted.saturating_sub(data.len());
        stream.send_ended = end;
        loop {
            let piece = data.split_to(data.len().min(max));
            let last = data.is_empty();
            let flags = if end && last { frame::END_STREAM } else { 0 };
            frame::put_head(self.out.buf(), piece.len(), frame::DATA, flags, id);
            self.out.push_payload(piece);
            if last {
                break;
            }
        }
        self.wake_task();
        Ok(())
    }

    /// Queues trailers, which end the request.
    pub fn send_trailers(&mut self, id: u32, trailers: &HeaderMap) -> Result<(), h2::Error> {
        let stream = self.streams.get_mut(&id).ok_or_else(closed_stream)?;
        if let Some(failure) = stream.failure {
            return Err(failure.error(id));
        }
        if stream.send_ended {
            return Err(closed_stream());
        }
        stream.send_ended = true;
        self.put_header_block(id, frame::END_STREAM, |buf| {
            for (name, value) in trailers {
                super::hpack::put_field(buf, name, value);
            }
        });
        self.wake_task();
        Ok(())
    }

    /// The caller resets stream `id`.
    pub fn send_reset(&mut self, id: u32, reason: Reason) {
        self.reset(id, reason);
    }

    /// The backend's reset of stream `id`, once it happened; else registers `waker`.
    pub fn poll_reset(&mut self, id: u32, waker: &Waker) -> Option<Result<Reason, h2::Error>> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Some(Err(closed_stream()));
        };
        match stream.failure {
            Some(failure) => Some(failure.reset_reason().ok_or_else(|| failure.error(id))),
            None => {
                set_waker(&mut stream.send_waker, waker);
                None
            }
        }
    }

    /// Registers `waker` for stream `id`'s next receive event.
    pub fn wait_recv(&mut self, id: u32, waker: &Waker) {
        if let Some(stream) = self.streams.get_mut(&id) {
            set_waker(&mut stream.recv_waker, waker);
        }
    }

    /// The caller consumed `n` bytes of stream `id`'s DATA: the backend may send that much
    /// more. WINDOW_UPDATEs go out once half a window has been consumed.
    pub fn release(&mut self, id: u32, n: usize) {
        let n = n as i64;
        let half = i64::from(self.local.stream_window) / 2;
        let mut update = None;
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.unreleased_data = stream.unreleased_data.saturating_sub(n as usize);
            stream.unreleased += n;
            if stream.unreleased >= half && !stream.recv_ended && stream.failure.is_none() {
                update = Some(stream.unreleased);
                stream.recv_window += stream.unreleased;
                stream.unreleased = 0;
            }
        }
        if let Some(increment) = update {
            frame::put_window_update(self.out.buf(), id, increment as u32);
            self.wake_task();
        }
        self.release_connection(n);
    }

    fn release_connection(&mut self, n: i64) {
        self.unreleased += n;
        if self.unreleased >= i64::from(self.local.connection_window) / 2 {
            frame::put_window_update(self.out.buf(), 0, self.unreleased as u32);
            self.recv_window += self.unreleased;
            self.unreleased = 0;
            self.wake_task();
        }
    }

    /// A handle on stream `id` was dropped. With the last one, the stream goes: reset with
    /// CANCEL if it was still open, and its unread bytes and unsent capacity go back to the
    /// connection.
    pub fn drop_handle(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.handles -= 1;
        if stream.handles > 0 {
            return;
        }
        let open = stream.failure.is_none() && !(stream.send_ended && stream.recv_ended);
        if open {
            self.reset(id, Reason::CANCEL);
        }
        if let Some(stream) = self.streams.remove(&id) {
            self.send_window += stream.granted as i64;
            self.release_connection(stream.unreleased_data as i64);
        }
        if self.streams.is_empty() {
            // The task may be waiting for the last stream to close the connection.
            self.wake_task();
        }
    }

    /// Resets stream `id` from our side: RST_STREAM out, and both halves fail.
    fn reset(&mut self, id: u32, reason: Reason) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.failure.is_some() || (stream.send_ended && stream.recv_ended) {
            return;
        }
        stream.failure = Some(Failure::LocalReset(reason));
        wake_both(stream);
        frame::put_rst_stream(self.out.buf(), id, reason.into());
        self.wake_task();
    }

    // ===== what the backend sent (the connection task calls these) =====

    /// The connection failed: every stream fails with `failure`, and no new one starts.
    pub fn fail(&mut self, failure: Failure) {
        if self.failure.is_some() {
            return;
        }
        self.failure = Some(failure);
        for stream in self.streams.values_mut() {
            if stream.failure.is_none() && !(stream.send_ended && stream.recv_ended) {
                stream.failure = Some(failure);
            }
            wake_both(stream);
        }
    }

    /// A connection error found in what the backend sent: GOAWAY with `reason`, then close.
    pub fn connection_error(&mut self, reason: Reason) {
        if self.failure.is_none() {
            frame::put_goaway(self.out.buf(), 0, reason.into());
        }
        self.fail(Failure::LocalGoAway(reason));
    }

    /// A stream error found in what the backend sent on stream `id`.
    fn stream_error(&mut self, id: u32, reason: Reason) {
        self.reset(id, reason);
    }

    /// Checks that `id` names a stream sluice opened; a frame on one it never opened is a
    /// connection error.
    fn known_id(&mut self, id: u32) -> bool {
        if id == 0 || id.is_multiple_of(2) || id >= self.next_id {
            self.connection_error(Reason::PROTOCOL_ERROR);
            return false;
        }
        true
    }

    pub fn on_data(&mut self, head: frame::Head, mut payload: BytesMut) {
        let len = head.len as i64;
        if !self.known_id(head.stream) {
            return;
        }
        self.recv_window -= len;
        if self.recv_window < 0 {
            return self.connection_error(Reason::FLOW_CONTROL_ERROR);
        }
        let Some((start, end)) = frame::unpad(&payload, head.flags) else {
            return self.connection_error(Reason::PROTOCOL_ERROR);
        };
        let id = head.stream;
        let Some(stream) = self.streams.get_mut(&id) else {
            // A stream we already let go of: its bytes go back at once.
            return self.release_connection(len);
        };
        if !stream.got_headers || stream.recv_ended || stream.failure.is_some() {
            let reason = match (stream.failure, stream.recv_ended) {
                (Some(_), _) => None,
                (None, true) => Some(Reason::STREAM_CLOSED),
                (None, false) => Some(Reason::PROTOCOL_ERROR),
            };
            self.release_connection(len);
            if let Some(reason) = reason {
                self.stream_error(id, reason);
            }
            return;
        }
        stream.recv_window -= len;
        if stream.recv_window < 0 {
            self.release_connection(len);
            return self.stream_error(id, Reason::FLOW_CONTROL_ERROR);
        }
        let data_len = end - start;
        // Padding is consumed at once.
        let padding = len - data_len as i64;
        if data_len > 0 {
            payload.truncate(end);
            payload.advance(start);
            stream.data.push_back(payload.freeze());
            stream.unreleased_data += data_len;
        }
        if head.flags & frame::END_STREAM != 0 {
            stream.recv_ended = true;
        }
        stream.unreleased_data += padding as usize;
        if let Some(waker) = stream.recv_waker.take() {
            waker.wake();
        }
        if padding > 0 {
            self.release(id, padding as usize);
        }
    }

    /// A whole header block (HEADERS and any CONTINUATIONs) for stream `id`, decoded.
    pub fn on_headers(&mut self, id: u32, end_stream: bool, decoded: Decoded) {
        if !self.known_id(id) {
            return;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.recv_ended || stream.failure.is_some() {
            let closed = stream.recv_ended;
            if closed {
                self.stream_error(id, Reason::STREAM_CLOSED);
            }
            return;
        }
        let Decoded {
            status,
            headers,
            malformed,
        } = decoded;
        let reason = match (stream.got_headers, status) {
            _ if malformed => Some(Reason::PROTOCOL_ERROR),
            // Trailers: no status, and they end the stream.
            (true, None) if end_stream => {
                stream.trailers = Some(Box::new(headers));
                None
            }
            (true, _) => Some(Reason::PROTOCOL_ERROR),
            // An informational answer (100 Continue): the real one follows.
            (false, Some(status)) if status.is_informational() => {
                end_stream.then_some(Reason::PROTOCOL_ERROR)
            }
            (false, Some(status)) => {
                let mut response = http::Response::new(());
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                stream.response = Some(Box::new(response.into_parts().0));
                stream.got_headers = true;
                None
            }
            (false, None) => Some(Reason::PROTOCOL_ERROR),
        };
        if let Some(reason) = reason {
            return self.stream_error(id, reason);
        }
        if end_stream {
            stream.recv_ended = true;
        }
        if let Some(waker) = stream.recv_waker.take() {
            waker.wake();
        }
    }

    pub fn on_rst_stream(&mut self, id: u32, reason: Reason) {
        if !self.known_id(id) {
            return;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.failure.is_none() {
            stream.failure = Some(Failure::RemoteReset(reason));
        }
        let granted = std::mem::take(&mut stream.granted);
        wake_both(stream);
        self.send_window += granted as i64;
    }

    pub fn on_window_update(&mut self, id: u32, increment: u32) {
        let increment = i64::from(increment);
        if id == 0 {
            if increment == 0 {
                return self.connection_error(Reason::PROTOCOL_ERROR);
            }
            let was_closed = self.send_window <= 0;
            self.send_window += increment;
            if self.send_window > MAX_WINDOW {
                return self.connection_error(Reason::FLOW_CONTROL_ERROR);
            }
            if was_closed {
                self.streams.values_mut().for_each(wake_send);
            }
            return;
        }
        if !self.known_id(id) {
            return;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if increment == 0 {
            return self.stream_error(id, Reason::PROTOCOL_ERROR);
        }
        stream.send_window += increment;
        if stream.send_window > MAX_WINDOW {
            return self.stream_error(id, Reason::FLOW_CONTROL_ERROR);
        }
        wake_send(stream);
    }

    /// The backend's SETTINGS (not an ACK); answers with an ACK.
    pub fn on_settings(&mut self, payload: &[u8]) {
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > MAX_WINDOW {
                        return self.connection_error(Reason::FLOW_CONTROL_ERROR);
                    }
                    let delta = i64::from(value) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(value);
                    for stream in self.streams.values_mut() {
                        stream.send_window += delta;
                        if delta > 0 {
                            wake_send(stream);
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return self.connection_error(Reason::PROTOCOL_ERROR);
                    }
                    self.peer_max_frame = value as usize;
                }
                frame::SETTINGS_MAX_CONCURRENT_STREAMS => {
                    self.peer_max_streams = value as usize;
                }
                frame::SETTINGS_ENABLE_PUSH if value > 1 => {
                    return self.connection_error(Reason::PROTOCOL_ERROR);
                }
                // HEADER_TABLE_SIZE: our encoder never uses the table; others: ignored.
                _ => {}
            }
        }
        frame::put_settings_ack(self.out.buf());
        self.wake_task();
    }

    pub fn on_ping(&mut self, ack: bool, payload: [u8; 8]) {
        if !ack {
            frame::put_ping(self.out.buf(), true, payload);
            self.wake_task();
        } else if self.ping_out && payload == PING_PAYLOAD {
            self.ping_out = false;
            self.pong = true;
        }
    }

    /// The backend's GOAWAY: streams above `last_id` were not processed and fail (a caller
    /// may retry them elsewhere); the rest finish; no new stream starts.
    pub fn on_goaway(&mut self, last_id: u32, reason: Reason) {
        let last_id = self
            .going_away
            .map_or(last_id, |(before, _)| before.min(last_id));
        self.going_away = Some((last_id, reason));
        for (id, stream) in self.streams.iter_mut() {
            if *id > last_id && stream.failure.is_none() {
                stream.failure = Some(Failure::RemoteGoAway(reason));
                wake_both(stream);
            }
        }
    }

    /// Queues our keepalive PING.
    pub fn send_ping(&mut self) -> Result<(), h2::Error> {
        if let Some(failure) = self.failure {
            return Err(failure.error(0));
        }
        frame::put_ping(self.out.buf(), false, PING_PAYLOAD);
        self.ping_out = true;
        self.wake_task();
        Ok(())
    }
}

/// A decoded header block.
#[derive(Debug, Default, Clone)]
pub struct Decoded {
    pub status: Option<http::StatusCode>,
    pub headers: HeaderMap,
    /// A request pseudo-header, a pseudo-header after a regular field, or a
    /// connection-specific field (RFC 9113 §8.2.2, §8.3).
    pub malformed: bool,
}

fn closed_stream() -> h2::Error {
    proxying::library_reset(0, Reason::STREAM_CLOSED)
}

fn set_waker(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

fn wake_send(stream: &mut Stream) {
    if let Some(waker) = stream.send_waker.take() {
        waker.wake();
    }
}

fn wake_both(stream: &mut Stream) {
    if let Some(waker) = stream.recv_waker.take() {
        waker.wake();
    }
    wake_send(stream);
}
