//! Write coalescing for HTTP/2 connections.
//!
//! Without it every stream's frames leave in their own `writev`: 2 per request, about 40% of
//! the CPU of a small call. When the connection carries more than one stream, the first write
//! of a flush is delayed by one scheduler pass, so the frames the other streams queue in the
//! meantime leave in the same `writev` (~30% less CPU per call on the prototype; see
//! docs/architecture.md, "Write coalescing"). A connection with a single stream writes at once,
//! so a lone call pays no latency.
//!
//! "More than one stream" replaced "wrote less than 500 µs ago": at 31k calls/s over one
//! connection × 16 streams a batch cycle is ~500 µs, so that test missed half the time
//! (1.54 writes per call, against 2.89 without coalescing; /proc/PID/io, h2load -c1 -m16).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Wraps a connection's socket; reads pass straight through.
#[derive(Debug)]
pub struct CoalescingIo<T> {
    inner: T,
    /// Streams open on this connection, counted by its owner (the downstream connection
    /// loop, or the upstream pool).
    streams: Arc<AtomicUsize>,
    /// True after a write was deferred once: the next one goes through.
    deferred: bool,
    enabled: bool,
}

impl<T> CoalescingIo<T> {
    pub fn new(inner: T, streams: Arc<AtomicUsize>) -> CoalescingIo<T> {
        CoalescingIo {
            inner,
            streams,
            deferred: false,
            enabled: coalescing_enabled(),
        }
    }

    /// Returns `Pending` once (after waking itself) when the connection is busy; the caller's
    /// task goes to the back of the run queue and other streams' frames join the buffer.
    fn defer(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.enabled {
            return false;
        }
        if self.deferred {
            self.deferred = false;
            return false;
        }
        let busy = self.streams.load(Ordering::Relaxed) > 1;
        if busy {
            self.deferred = true;
            cx.waker().wake_by_ref();
        }
        busy
    }
}

/// `SLUICE_COALESCE=0` turns coalescing off, for before/after measurements only.
fn coalescing_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SLUICE_COALESCE").map_or(true, |v| v != "0"))
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
