//! Answers the proxy writes itself: gRPC statuses (trailers-only), and plain HTTP for clients
//! that are not gRPC or not HTTP/2.

use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Response, StatusCode};
use pingora_core::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::wire::ProxyStatus;

/// Answers with a proxy-made gRPC status, trailers-only.
pub(super) fn status(respond: &mut SendResponse<Bytes>, status: ProxyStatus) {
    debug!(code = ?status.code, message = %status.message, "proxy reply");
    // Fails only if the client already reset the stream: then nobody is waiting.
    let _ = respond.send_response(status.to_response(), true);
}

/// A request that is not gRPC (wrong method or content-type): a plain HTTP error that says so,
/// on this stream only.
pub(super) fn not_grpc(respond: &mut SendResponse<Bytes>, request: &http::request::Parts) {
    let (status, text) = if request.method != Method::POST {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "sluice: {} is not gRPC: gRPC calls use POST\n",
                request.method
            ),
        )
    } else {
        let content_type = request
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "none".into());
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "sluice: content-type {content_type:?} is not gRPC: expected application/grpc\n"
            ),
        )
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(mut stream) = respond.send_response(response, false) {
        let _ = stream.send_data(Bytes::from(text), true);
    }
}

/// An HTTP/1 client on a gRPC listener gets a readable answer instead of a dropped connection.
pub(super) async fn not_http2(io: &mut Stream) {
    const BODY: &str =
        "sluice: this port serves gRPC over HTTP/2 only (cleartext h2c with prior knowledge)\n";
    let response = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
    // Read what the client sent before closing: closing with unread bytes makes the kernel
    // send a RST, and the client may lose the answer. Bounded: 1 s and 64 KiB.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0;
        while total < 64 * 1024 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}
