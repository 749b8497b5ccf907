//! The upstream leg's stream types, whichever HTTP/2 client carries them: h2's, or, with the
//! `lean-upstream` feature, sluice's own (`lean/`). The proxy names only these.

use std::task::{Context, Poll};

use bytes::Bytes;
use h2::Reason;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

#[cfg(feature = "lean-upstream")]
pub use super::lean::{PingPong, RecvStream, ResponseFuture, SendStream, Sender};

#[cfg(not(feature = "lean-upstream"))]
pub type Sender = h2::client::SendRequest<Bytes>;
#[cfg(not(feature = "lean-upstream"))]
pub type ResponseFuture = h2::client::ResponseFuture;
#[cfg(not(feature = "lean-upstream"))]
pub type SendStream = h2::SendStream<Bytes>;
#[cfg(not(feature = "lean-upstream"))]
pub type RecvStream = h2::RecvStream;
#[cfg(not(feature = "lean-upstream"))]
pub type PingPong = h2::PingPong;

/// Fields sent in place of the request's fields of the same names (`None`: nothing).
pub type Extra = [Option<(HeaderName, HeaderValue)>];

/// Opens a stream for `head`, with the fields in `extra` replacing any of the same name.
/// `end`: the request has no body.
pub fn send_request(
    sender: &mut Sender,
    head: &http::request::Parts,
    extra: &Extra,
    end: bool,
) -> Result<(ResponseFuture, SendStream), h2::Error> {
    #[cfg(feature = "lean-upstream")]
    {
        sender.send_request(head, extra, end)
    }
    #[cfg(not(feature = "lean-upstream"))]
    {
        let mut head = head.clone();
        for (name, value) in extra.iter().flatten() {
            head.headers.insert(name.clone(), value.clone());
        }
        sender.send_request(http::Request::from_parts(head, ()), end)
    }
}

/// Where a pipe (`proxy::forward`) reads: a stream's DATA and trailers, with receive flow
/// control. The client's request body (h2) or the backend's response body (the upstream leg).
pub trait Source {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>)
        -> Poll<Result<Option<HeaderMap>, h2::Error>>;
    fn is_end_stream(&self) -> bool;
    /// `n` bytes were forwarded: the peer may send that much more.
    fn release_capacity(&mut self, n: usize);
}

/// Where a pipe writes: a stream's DATA and trailers, with send flow control, and the peer's
/// reset of it. The backend's request stream (the upstream leg) or the client's response.
pub trait Sink {
    fn reserve_capacity(&mut self, n: usize);
    fn poll_capacity(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<usize, h2::Error>>>;
    fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), h2::Error>;
    fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), h2::Error>;
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reason, h2::Error>>;
}

impl Source for h2::RecvStream {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
        h2::RecvStream::poll_data(self, cx)
    }
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, h2::Error>> {
        h2::RecvStream::poll_trailers(self, cx)
    }
    fn is_end_stream(&self) -> bool {
        h2::RecvStream::is_end_stream(self)
    }
    fn release_capacity(&mut self, n: usize) {
        // Fails only for more than was received: not the case, as `n` was just received.
        let _ = self.flow_control().release_capacity(n);
    }
}

impl Sink for h2::SendStream<Bytes> {
    fn reserve_capacity(&mut self, n: usize) {
        h2::SendStream::reserve_capacity(self, n)
    }
    fn poll_capacity(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<usize, h2::Error>>> {
        h2::SendStream::poll_capacity(self, cx)
    }
    fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), h2::Error> {
        h2::SendStream::send_data(self, data, end)
    }
    fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), h2::Error> {
        h2::SendStream::send_trailers(self, trailers)
    }
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reason, h2::Error>> {
        h2::SendStream::poll_reset(self, cx)
    }
}

#[cfg(feature = "lean-upstream")]
impl Source for RecvStream {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
        RecvStream::poll_data(self, cx)
    }
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, h2::Error>> {
        RecvStream::poll_trailers(self, cx)
    }
    fn is_end_stream(&self) -> bool {
        RecvStream::is_end_stream(self)
    }
    fn release_capacity(&mut self, n: usize) {
        RecvStream::release_capacity(self, n)
    }
}

#[cfg(feature = "lean-upstream")]
impl Sink for SendStream {
    fn reserve_capacity(&mut self, n: usize) {
        SendStream::reserve_capacity(self, n)
    }
    fn poll_capacity(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<usize, h2::Error>>> {
        SendStream::poll_capacity(self, cx)
    }
    fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), h2::Error> {
        SendStream::send_data(self, data, end)
    }
    fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), h2::Error> {
        SendStream::send_trailers(self, trailers)
    }
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reason, h2::Error>> {
        SendStream::poll_reset(self, cx)
    }
}
