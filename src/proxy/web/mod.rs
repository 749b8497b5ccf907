//! gRPC-Web for browsers (`listeners[].grpc_web`), over HTTP/1.1 (`http1.rs`) and HTTP/2.
//!
//! A gRPC-Web call is turned into a native one and served by the same code as any call:
//! sluice opens an in-memory HTTP/2 connection to its own listener (`serve_h2`), for that
//! call, with the client's address and identity, and sends the call there as
//! `application/grpc` with `te: trailers`. Routing, deadlines, balancing, retries, metrics
//! and the access log are the native call's. The answer comes back translated: the content
//! type, the text mode's base64 (`frames.rs`), the trailers as the body's last frame, and the
//! CORS headers (`cors.rs`). Native calls never take this path and pay nothing for it.

pub mod cors;
pub mod frames;
mod http1;
mod on_h2;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::{forward, Peer, Proxy};
use crate::wire::{self, Code};
pub use cors::{Cors, Origin};
pub use frames::Mode;
pub use on_h2::is_web_request;

/// Pieces of a body in flight between the two sides of a translated call.
const PIECES: usize = 8;

/// Headers that belong to one HTTP connection, or to gRPC-Web alone: never sent upstream.
const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "x-grpc-web",
    "te",
];

/// A gRPC-Web request: its head, and its body as it arrives (closed at its end; an `Err`
/// when the client's side failed).
pub struct WebRequest {
    pub head: http::request::Parts,
    pub mode: Mode,
    /// The native content type it goes upstream with.
    pub native: &'static str,
    pub body: mpsc::Receiver<Result<Bytes, String>>,
}

/// A gRPC-Web answer: its head, and its translated body, unless it is trailers-only.
pub struct WebAnswer {
    pub head: Response<()>,
    pub body: Option<mpsc::Receiver<Bytes>>,
}

impl Proxy {
    /// Answers one gRPC-Web call through an in-memory native connection to this listener.
    pub(super) async fn answer_web(
        self: &Arc<Self>,
        peer: &Peer,
        request: WebRequest,
    ) -> WebAnswer {
        let WebRequest {
            head,
            mode,
            native,
            body,
        } = request;
        let accepted = head.headers.get(http::header::CONTENT_TYPE).cloned();
        let answer_type =
            mode.answer_content_type(&accepted.unwrap_or(HeaderValue::from_static("")));
        let (mut sender, loopback) = match self.loopback(peer, mode).await {
            Some(opened) => opened,
            None => {
                return status_answer(
                    answer_type,
                    Code::Internal,
                    "sluice: cannot open the gRPC-Web loopback",
                )
            }
        };
        let native_request = native_request(head, native);
        let Ok((response, upload)) = sender.send_request(native_request, false) else {
            return status_answer(
                answer_type,
                Code::Internal,
                "sluice: the gRPC-Web loopback refused the call",
            );
        };
        tokio::spawn(upload_body(body, upload, mode));
        let Ok(response) = response.await else {
            return status_answer(
                answer_type,
                Code::Unavailable,
                "sluice: the call ended without an answer",
            );
        };
        let (mut parts, recv) = response.into_parts();
        parts
            .headers
            .insert(http::header::CONTENT_TYPE, answer_type);
        // The body is re-framed (the trailers added, base64 in text mode): a length the
        // backend gave no longer holds.
        parts.headers.remove(http::header::CONTENT_LENGTH);
        let trailers_only = recv.is_end_stream();
        let body = (!trailers_only).then(|| {
            let (pieces, body) = mpsc::channel(PIECES);
            tokio::spawn(download_body(recv, pieces, mode, loopback));
            body
        });
        WebAnswer {
            head: Response::from_parts(parts, ()),
            body,
        }
    }

    /// A native HTTP/2 connection to this listener, in memory, for one gRPC-Web call; the
    /// second value keeps it open until dropped.
    async fn loopback(
        self: &Arc<Self>,
        peer: &Peer,
        mode: Mode,
    ) -> Option<(h2::client::SendRequest<Bytes>, Loopback)> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let inner_peer = Arc::new(peer.for_web(mode));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let proxy = Arc::clone(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ends on its own once the client side has closed and its call has been logged.
        tokio::spawn(async move {
            proxy.serve_h2(server, inner_peer, deadline, shutdown).await;
        });
        let (sender, connection) = h2::client::handshake(client).await.ok()?;
        let driving = tokio::spawn(async move {
            let _ = connection.await;
        });
        Some((
            sender,
            Loopback {
                _stop: stop,
                driving,
            },
        ))
    }
}

/// The client side of one loopback connection: closed when dropped, once the call's answer
/// has been read.
pub struct Loopback {
    /// Held while the call runs: a dropped sender reads as a shutdown.
    _stop: tokio::sync::watch::Sender<bool>,
    driving: tokio::task::JoinHandle<()>,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.driving.abort();
    }
}

/// The native request for a gRPC-Web one: same path and metadata, the native content type,
/// `te: trailers`, and nothing that belongs to the HTTP/1.1 connection.
fn native_request(head: http::request::Parts, native: &'static str) -> Request<()> {
    // The authority the client asked for goes upstream, as for a native call: HTTP/2's, or
    // HTTP/1.1's `host`.
    let host = (head.headers.get(http::header::HOST))
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let authority = (head.uri.authority().cloned())
        .or(host)
        .unwrap_or(http::uri::Authority::from_static("localhost"));
    let mut headers = head.headers;
    for name in HOP_HEADERS {
        headers.remove(*name);
    }
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(native));
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .unwrap_or_default();
    let mut request = Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// Sends the client's body upstream, decoding the text mode; a body that is not base64, or
/// a client that failed, resets the call.
async fn upload_body(
    mut body: mpsc::Receiver<Result<Bytes, String>>,
    mut upload: h2::SendStream<Bytes>,
    mode: Mode,
) {
    let mut text = frames::TextDecoder::default();
    while let Some(piece) = body.recv().await {
        let piece = match (piece, mode) {
            (Ok(piece), Mode::Binary) => Ok(piece),
            (Ok(piece), Mode::Text) => text.push(&piece),
            (Err(error), _) => Err(error),
        };
        let sent = match piece {
            Ok(piece) if piece.is_empty() => continue,
            Ok(piece) => forward::send_all(&mut upload, piece, false).await.is_ok(),
            Err(error) => {
                debug!(%error, "gRPC-Web request body failed; the call is reset");
                false
            }
        };
        if !sent {
            upload.send_reset(h2::Reason::CANCEL);
            return;
        }
    }
    if text.finish().is_err() {
        upload.send_reset(h2::Reason::CANCEL);
        return;
    }
    let _ = upload.send_data(Bytes::new(), true);
}

/// Reads the native answer's body and trailers and sends them on translated: messages as
/// they arrive, then the trailer frame, base64 in text mode.
async fn download_body(
    mut recv: RecvStream,
    pieces: mpsc::Sender<Bytes>,
    mode: Mode,
    _loopback: Loopback,
) {
    let mut text = frames::TextEncoder::default();
    let mut encode = |bytes: &[u8]| match mode {
        Mode::Binary => Bytes::copy_from_slice(bytes),
        Mode::Text => text.push(bytes),
    };
    while let Some(data) = recv.data().await {
        let Ok(data) = data else {
            break;
        };
        let _ = recv.flow_control().release_capacity(data.len());
        let piece = encode(&data);
        if !piece.is_empty() && pieces.send(piece).await.is_err() {
            return; // the client left: dropping the stream resets the call
        }
    }
    let trailers = match recv.trailers().await {
        Ok(Some(trailers)) => trailers,
        // Reset or cut short: the client still gets a status.
        _ => reset_trailers(),
    };
    let mut last = encode(&frames::trailer_frame(&trailers)).to_vec();
    if mode == Mode::Text {
        last.extend_from_slice(&text.finish());
    }
    let _ = pieces.send(Bytes::from(last)).await;
}

fn reset_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert(
        wire::GRPC_STATUS,
        HeaderValue::from(Code::Unavailable as u32),
    );
    trailers.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static("sluice: the call was reset before its trailers"),
    );
    trailers
}

/// A trailers-only answer sluice makes itself, when the loopback fails.
fn status_answer(content_type: HeaderValue, code: Code, message: &'static str) -> WebAnswer {
    let mut head = Response::new(());
    let headers = head.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, content_type);
    headers.insert(wire::GRPC_STATUS, HeaderValue::from(code as u32));
    headers.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static(message),
    );
    WebAnswer { head, body: None }
}
