//! gRPC-Web over HTTP/2: a stream on a listener with `grpc_web` whose content type is
//! gRPC-Web (or a preflight `OPTIONS`) is answered here instead of as a native call.

use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use tokio::sync::mpsc;

use super::{frames, Origin, WebAnswer, WebRequest, PIECES};
use crate::proxy::call::Downstream;
use crate::proxy::{forward, Peer, Proxy};

/// Whether a request that is not native gRPC is gRPC-Web's (a call or a preflight).
pub fn is_web_request(request: &http::request::Parts) -> bool {
    request.method == Method::OPTIONS
        || frames::of_content_type(request.headers.get(http::header::CONTENT_TYPE)).is_some()
}

impl Proxy {
    /// Answers a gRPC-Web call or preflight that arrived on an HTTP/2 stream.
    pub(in crate::proxy) async fn serve_web_h2(
        self: &Arc<Self>,
        down: &mut Downstream,
        peer: &Peer,
    ) {
        let (Some(cors), Some(head)) = (&self.grpc_web, down.request.take()) else {
            return;
        };
        let head = *head;
        if head.method == Method::OPTIONS {
            let answer = cors.preflight(&head.headers);
            let _ = down.respond.send_response(answer, true);
            return;
        }
        let origin = cors.origin(&head.headers);
        let Some((mode, native)) =
            frames::of_content_type(head.headers.get(http::header::CONTENT_TYPE))
        else {
            return;
        };
        let (pieces, body) = mpsc::channel(PIECES);
        let reading = read_body(&mut down.body, pieces);
        tokio::pin!(reading);
        let answering = self.answer_web(
            peer,
            WebRequest {
                head,
                mode,
                native,
                body,
            },
        );
        tokio::pin!(answering);
        let mut read_done = false;
        let mut answer = loop {
            tokio::select! {
                answer = &mut answering => break answer,
                _ = &mut reading, if !read_done => read_done = true,
            }
        };
        if let Origin::Allowed(origin) = &origin {
            cors.decorate(origin, answer.head.headers_mut());
        }
        let sending = send_answer(&mut down.respond, answer);
        tokio::pin!(sending);
        loop {
            tokio::select! {
                _ = &mut sending => return,
                _ = &mut reading, if !read_done => read_done = true,
            }
        }
    }
}

/// Hands the request body on as it arrives, giving the client its window back.
async fn read_body(body: &mut RecvStream, pieces: mpsc::Sender<Result<Bytes, String>>) {
    while let Some(data) = body.data().await {
        let piece = data.map_err(|e| e.to_string());
        if let Ok(data) = &piece {
            let _ = body.flow_control().release_capacity(data.len());
        }
        let failed = piece.is_err();
        if pieces.send(piece).await.is_err() || failed {
            return;
        }
    }
}

/// Sends the translated answer: its head, then its pieces as they come.
async fn send_answer(respond: &mut SendResponse<Bytes>, answer: WebAnswer) {
    let WebAnswer { mut head, body } = answer;
    *head.status_mut() = StatusCode::OK;
    let Ok(mut stream) = respond.send_response(
        Response::from_parts(head.into_parts().0, ()),
        body.is_none(),
    ) else {
        return;
    };
    let Some(mut pieces) = body else { return };
    while let Some(piece) = pieces.recv().await {
        if forward::send_all(&mut stream, piece, false).await.is_err() {
            return;
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}
