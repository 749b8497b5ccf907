//! The downstream PING policy, as grpc-go's server enforces it (`keepalive.min_ping_interval`,
//! `permit_without_stream`). h2 answers PINGs itself and never shows them to us, so this
//! wrapper reads the frame headers as they pass: a client PING sooner than the minimum interval
//! after the previous one, or one while no stream is open (unless permitted), is a strike;
//! DATA or HEADERS the server sends clear the strikes (so BDP pings on a busy stream never
//! count). More than `MAX_STRIKES` trips the policy: the connection loop is told, and sends
//! GOAWAY ENHANCE_YOUR_CALM. h2 cannot attach debug data to a GOAWAY, so once the policy has
//! tripped, this wrapper adds grpc-go's `too_many_pings` to that GOAWAY as it goes out.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Strikes allowed before the policy trips (grpc-go's `maxPingStrikes`).
const MAX_STRIKES: u32 = 2;

/// The GOAWAY debug data grpc-go sends with ENHANCE_YOUR_CALM for too many pings.
const TOO_MANY_PINGS: &[u8] = b"too_many_pings";

/// What a client may do with PINGs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingRules {
    pub min_interval: Duration,
    /// PINGs while no stream is open are fine.
    pub permit_without_stream: bool,
}

/// Where the wrapper tells the connection loop that the policy tripped.
#[derive(Debug, Default)]
pub struct PingAlarm {
    tripped: AtomicBool,
    notify: Notify,
}

impl PingAlarm {
    /// Waits until the policy trips.
    pub async fn tripped(&self) {
        while !self.tripped.load(Ordering::Acquire) {
            self.notify.notified().await;
        }
    }
}

/// The socket of a downstream connection, with its PING policy.
#[derive(Debug)]
pub struct PingWatch<T> {
    inner: T,
    rules: PingRules,
    /// Streams open on the connection (counted by the connection loop).
    streams: Arc<AtomicUsize>,
    alarm: Arc<PingAlarm>,
    reading: FrameScan,
    writing: FrameScan,
    last_ping: Option<Instant>,
    strikes: u32,
    /// h2's ENHANCE_YOUR_CALM GOAWAY with debug data added, still to be written before h2's
    /// next bytes (only after the policy tripped).
    pending_goaway: Vec<u8>,
}

impl<T> PingWatch<T> {
    pub fn new(
        inner: T,
        rules: PingRules,
        streams: Arc<AtomicUsize>,
        alarm: Arc<PingAlarm>,
    ) -> Self {
        PingWatch {
            inner,
            rules,
            streams,
            alarm,
            // The client's bytes start with the 24-byte connection preface; the server's
            // with its SETTINGS frame.
            reading: FrameScan::after(24),
            writing: FrameScan::after(0),
            last_ping: None,
            strikes: 0,
            pending_goaway: Vec::new(),
        }
    }

    fn client_sent(&mut self, bytes: &[u8]) {
        let mut pings = 0;
        self.reading.scan(bytes, |kind, flags| {
            pings += usize::from(kind == PING && flags & ACK == 0);
        });
        for _ in 0..pings {
            self.on_ping(Instant::now());
        }
    }

    fn server_sent(&mut self, bytes: &[u8]) {
        let mut active = false;
        self.writing
            .scan(bytes, |kind, _| active |= kind == DATA || kind == HEADERS);
        if active {
            self.strikes = 0;
            self.last_ping = None;
        }
    }

    fn on_ping(&mut self, now: Instant) {
        let idle = self.streams.load(Ordering::Relaxed) == 0;
        let too_soon = self
            .last_ping
            .is_some_and(|last| now.duration_since(last) < self.rules.min_interval);
        self.last_ping = Some(now);
        if too_soon || (idle && !self.rules.permit_without_stream) {
            self.strikes += 1;
            if self.strikes > MAX_STRIKES && !self.alarm.tripped.swap(true, Ordering::Release) {
                self.alarm.notify.notify_one();
            }
        }
    }
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Where, in `buf` (starting at a frame boundary), a GOAWAY ENHANCE_YOUR_CALM without debug
/// data starts, if its 17 bytes are all in `buf`.
fn calm_goaway_at(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len =
            usize::from(buf[at]) << 16 | usize::from(buf[at + 1]) << 8 | usize::from(buf[at + 2]);
        if buf[at + 3] == GOAWAY && len == 8 && buf.len() >= at + 17 {
            let code = u32::from_be_bytes([buf[at + 13], buf[at + 14], buf[at + 15], buf[at + 16]]);
            if code == ENHANCE_YOUR_CALM {
                return Some(at);
            }
        }
        at += 9 + len;
    }
    None
}

/// The 17-byte GOAWAY `frame`, with `debug` appended to it.
fn with_debug_data(frame: &[u8], debug: &[u8]) -> Vec<u8> {
    let len = (8 + debug.len()) as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&frame[3..17]);
    out.extend_from_slice(debug);
    out
}

/// Follows frame boundaries in one direction of an HTTP/2 byte stream.
#[derive(Debug)]
struct FrameScan {
    /// Bytes still to skip: the rest of a preface or of a frame's payload.
    skip: usize,
    header: [u8; 9],
    have: usize,
}

impl FrameScan {
    fn after(skip: usize) -> FrameScan {
        FrameScan {
            skip,
            header: [0; 9],
            have: 0,
        }
    }

    /// Feeds `bytes`; calls `frame(type, flags)` for each frame header completed.
    fn scan(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                (self.skip, bytes) = (self.skip - n, &bytes[n..]);
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            (self.have, bytes) = (self.have + n, &bytes[n..]);
            if self.have == 9 {
                let h = self.header;
                frame(h[3], h[4]);
                self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.have = 0;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PingWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.client_sent(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> PingWatch<T> {
    /// Writes our own pending bytes first.
    fn poll_pending_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending_goaway.is_empty() {
            let n =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending_goaway))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_goaway.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// After the policy tripped: h2's bytes up to its ENHANCE_YOUR_CALM GOAWAY go through as
    /// they are; the GOAWAY itself goes out with `too_many_pings` as its debug data.
    fn poll_write_calmed(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending_goaway(cx))?;
        // Mid-frame (the socket took part of one): finish that frame alone, so the next
        // write starts at a boundary where the GOAWAY can be found.
        let left_in_frame = match self.writing.have {
            0 => self.writing.skip,
            have => 9 - have,
        };
        let buf = match calm_goaway_at(buf).filter(|_| left_in_frame == 0) {
            Some(0) => {
                let frame = &buf[..17];
                self.pending_goaway = with_debug_data(frame, TOO_MANY_PINGS);
                self.server_sent(frame);
                // Taken: what the socket does not accept now goes out on the next write or flush.
                let _ = self.poll_pending_goaway(cx)?;
                return Poll::Ready(Ok(17));
            }
            Some(at) => &buf[..at],
            None if left_in_frame > 0 => &buf[..left_in_frame.min(buf.len())],
            None => buf,
        };
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.server_sent(&buf[..n]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PingWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.alarm.tripped.load(Ordering::Relaxed) {
            return this.poll_write_calmed(cx, buf);
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.server_sent(&buf[..n]);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.alarm.tripped.load(Ordering::Relaxed) {
            // Rare and at the end of the connection: one slice at a time.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return this.poll_write_calmed(cx, first);
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = polled {
            for buf in bufs {
                let take = n.min(buf.len());
                this.server_sent(&buf[..take]);
                n -= take;
                if n == 0 {
                    break;
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending_goaway(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending_goaway(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn goaway(code: u32) -> Vec<u8> {
        let mut f = vec![0, 0, 8, GOAWAY, 0, 0, 0, 0, 0];
        f.extend_from_slice(&5u32.to_be_bytes());
        f.extend_from_slice(&code.to_be_bytes());
        f
    }

    #[test]
    fn the_calm_goaway_is_found_behind_other_frames_and_gets_debug_data() {
        let mut buf = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
        buf.extend_from_slice(&[7; 8]);
        buf.extend(goaway(ENHANCE_YOUR_CALM));
        assert_eq!(calm_goaway_at(&buf), Some(17));
        assert_eq!(calm_goaway_at(&goaway(0x1)), None);
        // Cut short: not yet.
        assert_eq!(calm_goaway_at(&buf[..30]), None);
        let rewritten = with_debug_data(&goaway(ENHANCE_YOUR_CALM), TOO_MANY_PINGS);
        assert_eq!(&rewritten[..3], &[0, 0, 22]);
        assert_eq!(&rewritten[3..17], &goaway(ENHANCE_YOUR_CALM)[3..]);
        assert_eq!(&rewritten[17..], b"too_many_pings");
    }

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            flags,
        ];
        f.extend([0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(0, payload));
        f
    }

    #[test]
    fn frame_headers_are_found_across_reads_of_any_size() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 6));
        bytes.extend(frame(PING, 0, 8));
        bytes.extend(frame(PING, ACK, 8));
        bytes.extend(frame(HEADERS, 0x4, 20));
        for chunk in [1, 2, 7, 9, 100] {
            let mut scan = FrameScan::after(24);
            let mut seen = Vec::new();
            for piece in bytes.chunks(chunk) {
                scan.scan(piece, |kind, flags| seen.push((kind, flags)));
            }
            assert_eq!(
                seen,
                [(0x4, 0), (PING, 0), (PING, ACK), (HEADERS, 0x4)],
                "{chunk}"
            );
        }
    }

    #[test]
    fn pings_too_soon_or_without_streams_trip_after_two_strikes() {
        let rules = PingRules {
            min_interval: Duration::from_secs(300),
            permit_without_stream: false,
        };
        let streams = Arc::new(AtomicUsize::new(1));
        let alarm = Arc::new(PingAlarm::default());
        let mut watch = PingWatch::new((), rules, Arc::clone(&streams), Arc::clone(&alarm));
        let t0 = Instant::now();
        // The first PING on a connection with a stream is fine; two quick ones are strikes.
        for k in 0..3 {
            watch.on_ping(t0 + Duration::from_millis(k));
        }
        assert!(!alarm.tripped.load(Ordering::Relaxed));
        // The server sending HEADERS clears them.
        watch.server_sent(&frame(HEADERS, 0x4, 3));
        for k in 0..3 {
            watch.on_ping(t0 + Duration::from_millis(10 + k));
        }
        assert!(!alarm.tripped.load(Ordering::Relaxed));
        watch.on_ping(t0 + Duration::from_millis(20));
        assert!(alarm.tripped.load(Ordering::Relaxed));
        // Without streams, every PING is a strike unless permitted.
        streams.store(0, Ordering::Relaxed);
        let idle_alarm = Arc::new(PingAlarm::default());
        let mut idle = PingWatch::new((), rules, streams, Arc::clone(&idle_alarm));
        for k in 0..3 {
            idle.on_ping(t0 + Duration::from_secs(600 * k));
        }
        assert!(idle_alarm.tripped.load(Ordering::Relaxed));
    }
}
