//! gRPC-Web over HTTP/1.1, served by hyper: each request is a preflight (answered here), a
//! gRPC-Web call (translated, `mod.rs`), or refused with a plain HTTP error.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::{frames, Cors, Origin, WebRequest, PIECES};
use crate::proxy::{Peer, Proxy};

type Body = BoxBody<Bytes, Infallible>;

impl Proxy {
    /// Serves an HTTP/1.1 connection on a listener with `grpc_web`, until the client closes
    /// it, or sluice drains (then the request in progress finishes first).
    pub(in crate::proxy) async fn serve_http1<IO>(
        self: &Arc<Self>,
        io: IO,
        peer: Arc<Peer>,
        mut shutdown: ShutdownWatch,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = Arc::clone(self);
        let service = service_fn(move |request| {
            let (proxy, peer) = (Arc::clone(&proxy), Arc::clone(&peer));
            async move { Ok::<_, Infallible>(proxy.http1_request(&peer, request).await) }
        });
        // The timer gives hyper's header read timeout (30 s) its clock: a client that sends a
        // request head slowly, or idles between requests, is closed.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut draining = self.lifecycle.draining();
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = draining.wait_for(|d| *d) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    }

    async fn http1_request(
        self: &Arc<Self>,
        peer: &Peer,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let Some(cors) = &self.grpc_web else {
            return plain(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "sluice: gRPC needs HTTP/2\n",
            );
        };
        if request.method() == Method::OPTIONS {
            return cors.preflight(request.headers()).map(|()| empty());
        }
        let origin = cors.origin(request.headers());
        let content_type = request.headers().get(http::header::CONTENT_TYPE);
        let web = frames::of_content_type(content_type);
        let (mode, native) = match (request.method() == Method::POST, web) {
            (true, Some(web)) => web,
            (false, _) => {
                let refused = plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "sluice: gRPC-Web calls use POST\n",
                );
                return with_cors(refused, cors, &origin);
            }
            (true, None) => {
                let text = "sluice: over HTTP/1.1 sluice speaks gRPC-Web: application/grpc-web, application/grpc-web-text (+proto)\n";
                return with_cors(
                    plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, text),
                    cors,
                    &origin,
                );
            }
        };
        let (head, incoming) = request.into_parts();
        let (pieces, body) = mpsc::channel(PIECES);
        tokio::spawn(read_body(incoming, pieces));
        let answer = self
            .answer_web(
                peer,
                WebRequest {
                    head,
                    mode,
                    native,
                    body,
                },
            )
            .await;
        let (parts, ()) = answer.head.into_parts();
        let body = match answer.body {
            None => empty(),
            Some(pieces) => {
                let frames = ReceiverStream::new(pieces).map(|piece| Ok(Frame::data(piece)));
                BodyExt::boxed(StreamBody::new(frames))
            }
        };
        with_cors(Response::from_parts(parts, body), cors, &origin)
    }
}

/// Hands the request body on as it arrives; an `Err` when the client's side failed.
async fn read_body(mut incoming: Incoming, pieces: mpsc::Sender<Result<Bytes, String>>) {
    while let Some(frame) = incoming.frame().await {
        let piece = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue, // trailers: gRPC-Web requests have none
            },
            Err(error) => Err(error.to_string()),
        };
        let failed = piece.is_err();
        if pieces.send(piece).await.is_err() || failed {
            return;
        }
    }
}

fn with_cors(mut response: Response<Body>, cors: &Cors, origin: &Origin) -> Response<Body> {
    if let Origin::Allowed(origin) = origin {
        cors.decorate(origin, response.headers_mut());
    }
    response
}

fn empty() -> Body {
    BodyExt::boxed(Empty::new())
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
