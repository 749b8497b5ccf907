//! The lean leg against real peers on loopback: h2's server for the well-behaved cases, and a
//! raw-frame backend for what h2's server never sends (GOAWAY in the middle, resets, padding,
//! CONTINUATION, protocol errors).

use std::future::poll_fn;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use super::frame::{self, Head};
use super::*;

const LOCAL: Local = Local {
    stream_window: 1 << 20,
    connection_window: 4 << 20,
    max_frame_size: 16_384,
};

fn request() -> http::request::Parts {
    let request = http::Request::post("http://backend/echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    request.into_parts().0
}

/// A client connection to `addr`, its task spawned.
async fn connect(addr: &str) -> Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = handshake(tcp, LOCAL);
    tokio::spawn(connection);
    sender
}

async fn data(body: &mut RecvStream) -> Option<Result<Bytes, h2::Error>> {
    poll_fn(|cx| body.poll_data(cx)).await
}

/// Sends `body` whole, as the windows allow, then ends the stream.
async fn send_body(send: &mut SendStream, mut body: Bytes) {
    while !body.is_empty() {
        send.reserve_capacity(body.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
        let piece = body.split_to(granted.min(body.len()));
        send.send_data(piece, false).unwrap();
    }
    send.send_data(Bytes::new(), true).unwrap();
}

/// An h2 server with a small stream window, echoing each request body after its end, with
/// trailers.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::Builder::new()
            .initial_window_size(16 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            tokio::spawn(async move {
                let mut body = request.into_body();
                let mut whole = BytesMut::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    whole.extend_from_slice(&chunk);
                }
                let response = http::Response::builder().status(200).body(()).unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                let mut whole = whole.freeze();
                while !whole.is_empty() {
                    send.reserve_capacity(whole.len());
                    let n = poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
                    send.send_data(whole.split_to(n.min(whole.len())), false)
                        .unwrap();
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                send.send_trailers(trailers).unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_large_body_crosses_both_ways_within_the_windows() {
    let addr = echo_server().await;
    let mut sender = connect(&addr).await;
    // Three calls at once, each far larger than the server's 16 KiB stream window and the
    // 64 KiB connection window it starts with.
    let mut calls = Vec::new();
    for n in 0..3u8 {
        let (response, mut send) = sender.send_request(&request(), &[], false).unwrap();
        let body = Bytes::from(vec![n; 300 * 1024 + 7]);
        calls.push(tokio::spawn(async move {
            send_body(&mut send, body.clone()).await;
            let (head, mut recv) = response.await.unwrap().into_parts();
            assert_eq!(head.status, 200);
            let mut echoed = BytesMut::new();
            while let Some(chunk) = data(&mut recv).await {
                let chunk = chunk.unwrap();
                recv.release_capacity(chunk.len());
                echoed.extend_from_slice(&chunk);
            }
            let trailers = poll_fn(|cx| recv.poll_trailers(cx)).await.unwrap().unwrap();
            assert_eq!(trailers["grpc-status"], "0");
            assert!(recv.is_end_stream());
            assert_eq!(echoed.freeze(), body);
        }));
    }
    for call in calls {
        timeout(Duration::from_secs(20), call)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A backend that speaks raw frames: what the client sent, and what the test writes back.
struct Raw {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Accepts one connection, reads the preface, and sends empty SETTINGS.
    async fn accept(listener: &TcpListener) -> Raw {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut preface = [0; 24];
        tcp.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface[..], frame::PREFACE);
        let mut raw = Raw {
            tcp,
            buf: BytesMut::new(),
        };
        raw.send(frame::SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut out = BytesMut::new();
        frame::put_head(&mut out, payload.len(), kind, flags, stream);
        out.put_slice(payload);
        self.tcp.write_all(&out).await.unwrap();
    }

    /// The next frame the client sent, or `None` at its close.
    async fn next(&mut self) -> Option<(Head, Bytes)> {
        loop {
            if self.buf.len() >= frame::HEADER_LEN {
                let head = Head::parse(&self.buf);
                if self.buf.len() >= frame::HEADER_LEN + head.len {
                    let mut whole = self.buf.split_to(frame::HEADER_LEN + head.len);
                    return Some((head, whole.split_off(frame::HEADER_LEN).freeze()));
                }
            }
            let read = timeout(Duration::from_secs(10), self.tcp.read_buf(&mut self.buf));
            if read.await.unwrap().unwrap() == 0 {
                return None;
            }
        }
    }

    /// The next frame of `kind`, skipping others.
    async fn next_of(&mut self, kind: u8) -> Option<(Head, Bytes)> {
        loop {
            let (head, payload) = self.next().await?;
            if head.kind == kind {
                return Some((head, payload));
            }
        }
    }
}

async fn raw_server() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

/// `:status: 200`, indexed.
const STATUS_200: &[u8] = &[0x88];
/// `grpc-status: 0`, a literal with a new name.
const GRPC_OK: &[u8] = b"\x00\x0bgrpc-status\x010";

#[tokio::test]
async fn a_goaway_fails_the_streams_above_its_last_id_and_the_others_finish() {
    let (listener, addr) = raw_server().await;
    let mut sender = connect(&addr).await;
    let (first, _send1) = sender.send_request(&request(), &[], true).unwrap();
    let (second, _send3) = sender.send_request(&request(), &[], true).unwrap();
    let mut raw = Raw::accept(&listener).await;
    raw.next_of(frame::HEADERS).await.unwrap();
    raw.next_of(frame::HEADERS).await.unwrap();
    // Last stream id 1, reason NO_ERROR.
    raw.send(frame::GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0])
        .await;
    let refused = timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap_err();
    assert!(refused.is_go_away() && refused.is_remote(), "{refused:?}");
    assert!(sender.is_closed(), "no new stream after GOAWAY");
    assert!(sender.send_request(&request(), &[], true).is_err());
    raw.send(frame::HEADERS, frame::END_HEADERS, 1, STATUS_200)
        .await;
    let end = frame::END_HEADERS | frame::END_STREAM;
    raw.send(frame::HEADERS, end, 1, GRPC_OK).await;
    let response = timeout(Duration::from_secs(5), first)
        .await
        .unwrap()
        .unwrap();
    let mut body = response.into_body();
    assert!(data(&mut body).await.is_none());
    let trailers = poll_fn(|cx| body.poll_trailers(cx)).await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn a_reset_from_the_backend_reaches_both_halves() {
    let (listener, addr) = raw_server().await;
    let mut sender = connect(&addr).await;
    let (response, mut send) = sender.send_request(&request(), &[], false).unwrap();
    let mut raw = Raw::accept(&listener).await;
    raw.next_of(frame::HEADERS).await.unwrap();
    let refused: u32 = Reason::REFUSED_STREAM.into();
    raw.send(frame::RST_STREAM, 0, 1, &refused.to_be_bytes())
        .await;
    let error = timeout(Duration::from_secs(5), response)
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_reset() && error.is_remote(), "{error:?}");
    assert_eq!(error.reason(), Some(Reason::REFUSED_STREAM));
    let reset = poll_fn(|cx| send.poll_reset(cx)).await.unwrap();
    assert_eq!(reset, Reason::REFUSED_STREAM);
    assert!(send.send_data(Bytes::from_static(b"late"), true).is_err());
}

#[tokio::test]
async fn padding_and_continuation_frames_are_read_as_one_answer() {
    let (listener, addr) = raw_server().await;
    let mut sender = connect(&addr).await;
    let (response, _send) = sender.send_request(&request(), &[], true).unwrap();
    let mut raw = Raw::accept(&listener).await;
    raw.next_of(frame::HEADERS).await.unwrap();
    // `:status: 200`, then `x-long: <600 bytes>` in a CONTINUATION.
    raw.send(frame::HEADERS, 0, 1, STATUS_200).await;
    let mut field = BytesMut::from(&b"\x00\x06x-long\x7f"[..]);
    field.put_u8((600 - 127) as u8 | 0x80);
    field.put_u8(((600 - 127) >> 7) as u8);
    field.put_slice(&[b'v'; 600]);
    raw.send(frame::CONTINUATION, frame::END_HEADERS, 1, &field)
        .await;
    // DATA with 4 bytes of padding: pad length, "hello", padding.
    raw.send(frame::DATA, frame::PADDED, 1, b"\x04hello\0\0\0\0")
        .await;
    let end = frame::END_HEADERS | frame::END_STREAM;
    raw.send(frame::HEADERS, end, 1, GRPC_OK).await;
    let response = timeout(Duration::from_secs(5), response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.headers()["x-long"].len(), 600);
    let mut body = response.into_body();
    let chunk = data(&mut body).await.unwrap().unwrap();
    assert_eq!(&chunk[..], b"hello");
    body.release_capacity(chunk.len());
    assert!(data(&mut body).await.is_none());
}

#[tokio::test]
async fn a_protocol_error_closes_the_connection_with_goaway_and_fails_its_streams() {
    let (listener, addr) = raw_server().await;
    let mut sender = connect(&addr).await;
    let (response, _send) = sender.send_request(&request(), &[], true).unwrap();
    let mut raw = Raw::accept(&listener).await;
    raw.next_of(frame::HEADERS).await.unwrap();
    // DATA on stream 0.
    raw.send(frame::DATA, 0, 0, b"nope").await;
    let (_, goaway) = raw.next_of(frame::GOAWAY).await.unwrap();
    let code = u32::from_be_bytes([goaway[4], goaway[5], goaway[6], goaway[7]]);
    assert_eq!(Reason::from(code), Reason::PROTOCOL_ERROR);
    let error = timeout(Duration::from_secs(5), response)
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_go_away() && !error.is_remote(), "{error:?}");
    assert!(sender.is_closed());
    assert!(raw.next().await.is_none(), "the connection closed");
}

#[tokio::test]
async fn pings_and_settings_are_acknowledged_and_a_dropped_stream_is_cancelled() {
    let (listener, addr) = raw_server().await;
    let mut sender = connect(&addr).await;
    let (response, send) = sender.send_request(&request(), &[], false).unwrap();
    let mut raw = Raw::accept(&listener).await;
    let (settings, _) = raw.next_of(frame::SETTINGS).await.unwrap();
    assert_eq!(
        settings.flags & frame::ACK,
        0,
        "the client's own SETTINGS come first"
    );
    let (ack, _) = raw.next_of(frame::SETTINGS).await.unwrap();
    assert_eq!(ack.flags, frame::ACK);
    raw.send(frame::PING, 0, 0, b"12345678").await;
    let (pong, payload) = raw.next_of(frame::PING).await.unwrap();
    assert_eq!((pong.flags, &payload[..]), (frame::ACK, &b"12345678"[..]));
    // The caller gives up on the stream: it is reset with CANCEL.
    drop((response, send));
    let (reset, code) = raw.next_of(frame::RST_STREAM).await.unwrap();
    assert_eq!(reset.stream, 1);
    assert_eq!(
        Reason::from(u32::from_be_bytes([code[0], code[1], code[2], code[3]])),
        Reason::CANCEL
    );
}

#[tokio::test]
async fn a_connection_whose_stream_ids_ran_out_takes_no_new_stream() {
    let (listener, addr) = raw_server().await;
    let mut sender = connect(&addr).await;
    let _raw = Raw::accept(&listener).await;
    lock(&sender.inner.shared.state).skip_to_id((1 << 31) - 1);
    let (_last, _send) = sender.send_request(&request(), &[], true).unwrap();
    assert!(!sender.is_closed());
    let error = sender.send_request(&request(), &[], true).unwrap_err();
    assert!(error.is_go_away() && !error.is_remote(), "{error:?}");
    assert!(sender.is_closed(), "the pool lends it no more");
}

/// A held stream (a long server stream) keeps its state for hours: it stays small.
#[test]
fn a_stream_holds_little() {
    assert!(std::mem::size_of::<super::state::Stream>() <= 160);
}
