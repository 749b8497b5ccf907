//! An HTTP/2 client connection built for proxying gRPC: sluice's upstream leg under the
//! `lean-upstream` feature (docs/architecture.md, "An HTTP/2 path built for proxying").
//!
//! It does what the proxy needs of a client connection and nothing else: request header
//! blocks are encoded straight from the downstream request (static-table names and literals,
//! no `HeaderMap` copy, no encoder table); DATA goes out as the `Bytes` it came in; one task
//! per connection (`conn.rs`) reads and writes the socket for all its streams, and a call's
//! task is woken only for its own stream. Flow control, stream states, SETTINGS, PING,
//! GOAWAY and RST_STREAM follow RFC 9113 (`state.rs`). Answers are decoded with h2's HPACK
//! decoder, exposed by sluice's h2 fork (`vendor/h2/src/proxying.rs`), and errors are
//! `h2::Error` values, so the proxy reads both legs' failures the same way.

mod conn;
mod decode;
mod frame;
mod hpack;
mod output;
mod state;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::Reason;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};

pub use conn::Connection;
pub use state::Local;
use state::State;

use crate::sync::lock;

/// What the connection's task and its handles share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
}

/// Starts a client connection on `io`: the preface and SETTINGS are queued for the task's
/// first poll. Returns the handle calls open streams with, and the task to spawn.
pub fn handshake<T>(io: T, local: Local) -> (Sender, Connection<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(local)),
    });
    let sender = Sender {
        inner: Arc::new(SenderInner {
            shared: Arc::clone(&shared),
        }),
    };
    (sender, Connection::new(shared, io))
}

/// Opens streams on one connection. Cloning shares it; when the last clone and the last
/// stream are gone, the connection closes.
#[derive(Debug, Clone)]
pub struct Sender {
    inner: Arc<SenderInner>,
}

#[derive(Debug)]
struct SenderInner {
    shared: Arc<Shared>,
}

impl Drop for SenderInner {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.senders_gone = true;
        state.wake_task();
    }
}

impl Sender {
    /// Ready for a new stream: `Err` once the connection failed or the backend sent GOAWAY.
    pub async fn ready(self) -> Result<Sender, h2::Error> {
        let state = lock(&self.inner.shared.state);
        if let Some(failure) = state.failure {
            return Err(failure.error(0));
        }
        if let Some((_, reason)) = state.going_away {
            return Err(state::Failure::RemoteGoAway(reason).error(0));
        }
        drop(state);
        Ok(self)
    }

    /// The connection failed, or the backend sent GOAWAY: no new stream can start on it.
    pub fn is_closed(&self) -> bool {
        let state = lock(&self.inner.shared.state);
        state.failure.is_some() || state.going_away.is_some()
    }

    /// Opens a stream with `head`'s method, URI and headers, except those named in `extra`,
    /// whose values there replace them. `end`: the request has no body.
    pub fn send_request(
        &mut self,
        head: &http::request::Parts,
        extra: &[Option<(HeaderName, HeaderValue)>],
        end: bool,
    ) -> Result<(ResponseFuture, SendStream), h2::Error> {
        let shared = &self.inner.shared;
        let id = lock(&shared.state).open(end, |buf| {
            hpack::put_request_pseudo(buf, &head.method, &head.uri);
            for (name, value) in &head.headers {
                if !extra.iter().flatten().any(|(replaced, _)| replaced == name) {
                    hpack::put_field(buf, name, value);
                }
            }
            for (name, value) in extra.iter().flatten() {
                hpack::put_field(buf, name, value);
            }
        })?;
        let stream = |shared: &Arc<Shared>| StreamRef {
            shared: Arc::clone(shared),
            id,
        };
        Ok((
            ResponseFuture(Some(stream(shared))),
            SendStream {
                stream: stream(shared),
                wanted: 0,
            },
        ))
    }
}

/// One handle on a stream; the stream goes when its last handle does.
#[derive(Debug)]
struct StreamRef {
    shared: Arc<Shared>,
    id: u32,
}

impl StreamRef {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.shared.state)
    }
}

impl Drop for StreamRef {
    fn drop(&mut self) {
        self.state().drop_handle(self.id);
    }
}

/// The backend's response headers, to come.
#[derive(Debug)]
pub struct ResponseFuture(Option<StreamRef>);

impl Future for ResponseFuture {
    type Output = Result<Response<RecvStream>, h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(stream) = this.0.as_ref() else {
            return Poll::Pending;
        };
        let id = stream.id;
        let mut state = stream.state();
        let Some(entry) = state.stream(id) else {
            return Poll::Ready(Err(state::Failure::LocalReset(Reason::CANCEL).error(id)));
        };
        if let Some(parts) = entry.response.take() {
            drop(state);
            return match this.0.take() {
                Some(stream) => {
                    Poll::Ready(Ok(Response::from_parts(*parts, RecvStream { stream })))
                }
                None => Poll::Pending,
            };
        }
        if let Some(failure) = entry.failure {
            return Poll::Ready(Err(failure.error(id)));
        }
        state.wait_recv(id, cx.waker());
        Poll::Pending
    }
}

/// The response body and trailers.
#[derive(Debug)]
pub struct RecvStream {
    stream: StreamRef,
}

impl RecvStream {
    /// The next DATA chunk; `None` when the body is over (trailers may follow).
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
        let id = self.stream.id;
        let mut state = self.stream.state();
        let Some(entry) = state.stream(id) else {
            return Poll::Ready(None);
        };
        if let Some(chunk) = entry.data.pop_front() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        if entry.recv_ended {
            return Poll::Ready(None);
        }
        if let Some(failure) = entry.failure {
            return Poll::Ready(Some(Err(failure.error(id))));
        }
        state.wait_recv(id, cx.waker());
        Poll::Pending
    }

    /// The trailers, once the body is over; `None` when it ended without them.
    pub fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, h2::Error>> {
        let id = self.stream.id;
        let mut state = self.stream.state();
        let Some(entry) = state.stream(id) else {
            return Poll::Ready(Ok(None));
        };
        if let Some(trailers) = entry.trailers.take() {
            return Poll::Ready(Ok(Some(*trailers)));
        }
        if entry.recv_ended {
            return Poll::Ready(Ok(None));
        }
        if let Some(failure) = entry.failure {
            return Poll::Ready(Err(failure.error(id)));
        }
        state.wait_recv(id, cx.waker());
        Poll::Pending
    }

    /// True when nothing more will come: the body and trailers were all read.
    pub fn is_end_stream(&self) -> bool {
        let id = self.stream.id;
        let mut state = self.stream.state();
        state.stream(id).is_none_or(|entry| {
            entry.recv_ended && entry.data.is_empty() && entry.trailers.is_none()
        })
    }

    /// `n` bytes were forwarded: the backend may send that much more.
    pub fn release_capacity(&mut self, n: usize) {
        let id = self.stream.id;
        self.stream.state().release(id, n);
    }
}

/// The request's send half.
#[derive(Debug)]
pub struct SendStream {
    stream: StreamRef,
    /// Bytes the caller wants to send next (`reserve_capacity`).
    wanted: usize,
}

impl SendStream {
    pub fn reserve_capacity(&mut self, n: usize) {
        self.wanted = n;
    }

    /// Capacity to send, as the backend's windows allow: `Some(Ok(n))` with n > 0.
    pub fn poll_capacity(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<usize, h2::Error>>> {
        let id = self.stream.id;
        match self
            .stream
            .state()
            .poll_capacity(id, self.wanted, cx.waker())
        {
            Some(result) => Poll::Ready(Some(result)),
            None => Poll::Pending,
        }
    }

    pub fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), h2::Error> {
        let id = self.stream.id;
        self.stream.state().send_data(id, data, end)
    }

    pub fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), h2::Error> {
        let id = self.stream.id;
        self.stream.state().send_trailers(id, &trailers)
    }

    pub fn send_reset(&mut self, reason: Reason) {
        let id = self.stream.id;
        self.stream.state().send_reset(id, reason);
    }

    /// The backend's reset of this stream (or the connection's failure), once it happens.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reason, h2::Error>> {
        let id = self.stream.id;
        match self.stream.state().poll_reset(id, cx.waker()) {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }
}

/// The connection's keepalive PING, for its driver (which polls the connection in the same
/// task, so no waker of its own is needed: the ACK is read by the connection's poll).
#[derive(Debug)]
pub struct PingPong {
    shared: Arc<Shared>,
}

impl PingPong {
    pub fn send_ping(&mut self, _ping: h2::Ping) -> Result<(), h2::Error> {
        lock(&self.shared.state).send_ping()
    }

    /// `Ready` once the PING in flight was answered, or the connection failed.
    pub fn poll_pong(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        let mut state = lock(&self.shared.state);
        if std::mem::take(&mut state.pong) {
            return Poll::Ready(Ok(()));
        }
        match state.failure {
            Some(failure) => Poll::Ready(Err(failure.error(0))),
            None => Poll::Pending,
        }
    }
}
