//! The h2spec-style cases for an HTTP/2 server, against sluice's listener: each malformed
//! frame or header block, sent on a raw socket of its own, must get the connection error
//! (GOAWAY) or stream error (RST_STREAM) that RFC 9113 asks for, and nothing may panic: a
//! normal call on another connection works after all of them. Where `h2` answers with another
//! code than the RFC's, the case names the deviation (`known_deviation`). These cases are the
//! guard rail for any change to the HTTP/2 path (see docs/architecture.md).

mod support;

use std::time::Duration;

use support::raw_h2::*;
use support::{request, Echo, Sluice};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;

/// What the RFC asks of the server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// GOAWAY with this error code.
    Connection(u32),
    /// RST_STREAM on this stream with this code (a GOAWAY with it also satisfies the RFC,
    /// which lets an endpoint treat a stream error as a connection error).
    Stream(u32, u32),
    /// No error: the connection still answers a PING.
    Accepted,
}

/// What the server did, as far as the test can tell within the budget.
#[derive(Debug, PartialEq)]
enum Seen {
    Goaway(u32),
    Reset(u32, u32),
    PingAnswered,
    Closed,
    Nothing,
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    pairs
        .iter()
        .flat_map(|(id, value)| [&id.to_be_bytes()[..], &value.to_be_bytes()[..]].concat())
        .collect()
}

fn open_stream(stream: u32) -> Vec<u8> {
    frame(HEADERS, END_HEADERS, stream, &request_headers(&[]))
}

fn with_headers(stream: u32, headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        literal(name, value, &mut block);
    }
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
}

/// The cases: a name, the bytes sent after the preface and SETTINGS, and what must follow.
fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let post = [
        (":method", &b"POST"[..]),
        (":scheme", b"http"),
        (":path", b"/echo.v1.Echo/Unary"),
        (":authority", b"sluice"),
    ];
    let mut uppercase = post.to_vec();
    uppercase.push(("Content-Type", b"application/grpc"));
    let mut pseudo_after_regular = vec![("content-type", &b"application/grpc"[..])];
    pseudo_after_regular.extend_from_slice(&post);
    let mut connection_header = post.to_vec();
    connection_header.push(("connection", b"keep-alive"));
    let mut te_gzip = post.to_vec();
    te_gzip.push(("te", b"gzip"));
    let no_method = post[1..].to_vec();
    let mut padded_data = vec![10u8];
    padded_data.extend_from_slice(&[0; 4]);
    vec![
        // §6.1, §6.2: DATA and HEADERS need a stream.
        (
            "DATA on stream 0",
            frame(DATA, 0, 0, b"x"),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        (
            "HEADERS on stream 0",
            open_stream(0),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §5.1.1: client streams are odd, and only increase.
        (
            "HEADERS on an even stream",
            open_stream(2),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        (
            "a stream id lower than the last",
            [open_stream(5), open_stream(3)].concat(),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §6.5: SETTINGS.
        (
            "SETTINGS ACK with a payload",
            frame(SETTINGS, ACK, 0, &[0; 6]),
            Expect::Connection(FRAME_SIZE_ERROR),
        ),
        (
            "SETTINGS of a length not a multiple of 6",
            frame(SETTINGS, 0, 0, &[0; 5]),
            Expect::Connection(FRAME_SIZE_ERROR),
        ),
        (
            "SETTINGS on a stream",
            frame(SETTINGS, 0, 1, &[]),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        (
            "SETTINGS_ENABLE_PUSH of 2",
            frame(SETTINGS, 0, 0, &settings(&[(0x2, 2)])),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        (
            "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
            frame(SETTINGS, 0, 0, &settings(&[(0x4, 1 << 31)])),
            Expect::Connection(FLOW_CONTROL_ERROR),
        ),
        (
            "SETTINGS_MAX_FRAME_SIZE under 16384",
            frame(SETTINGS, 0, 0, &settings(&[(0x5, 16_383)])),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §6.7: PING.
        (
            "PING of 7 bytes",
            frame(PING, 0, 0, &[0; 7]),
            Expect::Connection(FRAME_SIZE_ERROR),
        ),
        (
            "PING on a stream",
            frame(PING, 0, 1, &[0; 8]),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §6.8: GOAWAY belongs to the connection.
        (
            "GOAWAY on a stream",
            frame(GOAWAY, 0, 1, &[0; 8]),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §6.9: WINDOW_UPDATE.
        (
            "WINDOW_UPDATE of 0 on the connection",
            frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        (
            "WINDOW_UPDATE of 0 on a stream",
            [
                open_stream(1),
                frame(WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes()),
            ]
            .concat(),
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        (
            "WINDOW_UPDATE past 2^31-1 on the connection",
            [
                frame(WINDOW_UPDATE, 0, 0, &0x7fff_0000u32.to_be_bytes()),
                frame(WINDOW_UPDATE, 0, 0, &0x7fff_0000u32.to_be_bytes()),
            ]
            .concat(),
            Expect::Connection(FLOW_CONTROL_ERROR),
        ),
        // §6.4: RST_STREAM on an idle stream.
        (
            "RST_STREAM on an idle stream",
            frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §6.10: CONTINUATION only right after HEADERS without END_HEADERS.
        (
            "CONTINUATION without HEADERS",
            frame(CONTINUATION, END_HEADERS, 1, &request_headers(&[])),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        (
            "another frame inside a header block",
            [
                frame(HEADERS, 0, 1, &request_headers(&[])),
                frame(DATA, 0, 1, b"x"),
            ]
            .concat(),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §4.2: a frame over SETTINGS_MAX_FRAME_SIZE (16,384 by default).
        (
            "DATA over the maximum frame size",
            [open_stream(1), frame(DATA, 0, 1, &vec![0; 16_385])].concat(),
            Expect::Connection(FRAME_SIZE_ERROR),
        ),
        // §4.3: a header block that does not decode.
        (
            "an HPACK index past the tables",
            frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0x7f]),
            Expect::Connection(COMPRESSION_ERROR),
        ),
        // §8.2, §8.3: malformed requests are stream errors.
        (
            "an uppercase header name",
            with_headers(1, &uppercase),
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        (
            "a pseudo-header after a regular one",
            with_headers(1, &pseudo_after_regular),
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        (
            "a connection-specific header",
            with_headers(1, &connection_header),
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        (
            "te other than trailers",
            with_headers(1, &te_gzip),
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        (
            "no :method",
            with_headers(1, &no_method),
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        // §5.1: DATA after the client ended the stream.
        (
            "DATA on a half-closed (remote) stream",
            [
                frame(HEADERS, END_HEADERS | END_STREAM, 1, &request_headers(&[])),
                frame(DATA, 0, 1, b"x"),
            ]
            .concat(),
            Expect::Stream(1, STREAM_CLOSED),
        ),
        // §6.3: PRIORITY is 5 bytes; otherwise a stream error.
        (
            "PRIORITY of 4 bytes",
            frame(PRIORITY, 0, 1, &[0; 4]),
            Expect::Stream(1, FRAME_SIZE_ERROR),
        ),
        // §6.1: padding longer than the frame.
        (
            "DATA padding past the frame",
            [open_stream(1), frame(DATA, PADDED, 1, &padded_data)].concat(),
            Expect::Connection(PROTOCOL_ERROR),
        ),
        // §4.1, §5.3.2: what a server must accept.
        (
            "an unknown frame type",
            frame(0xfa, 0, 0, b"anything"),
            Expect::Accepted,
        ),
        (
            "PRIORITY on an idle stream",
            frame(PRIORITY, 0, 3, &[0, 0, 0, 0, 16]),
            Expect::Accepted,
        ),
    ]
}

/// What the server did: the first GOAWAY or RST_STREAM within `budget`; else whether our PING
/// was answered (a RST_STREAM may follow the PING's answer: h2 sends answers to PINGs before
/// stream frames).
async fn verdict(tcp: &mut TcpStream, budget: Duration) -> Seen {
    let first = next_verdict(tcp, budget).await;
    if first != Seen::PingAnswered {
        return first;
    }
    match next_verdict(tcp, Duration::from_millis(500)).await {
        Seen::Nothing => Seen::PingAnswered,
        later => later,
    }
}

/// Where `h2` 0.4 (the library that frames sluice's listener) answers with another error than
/// the RFC's: it reports every frame it cannot load, and a header block that does not decode,
/// as PROTOCOL_ERROR, and a few stream errors as connection errors. The connection still ends
/// with GOAWAY, which is what protects the proxy; only the code differs. Listed so that a
/// change of behaviour, either way, shows here.
fn known_deviation(name: &str) -> Option<Seen> {
    let deviations = [
        ("SETTINGS ACK with a payload", Seen::Goaway(PROTOCOL_ERROR)),
        (
            "SETTINGS of a length not a multiple of 6",
            Seen::Goaway(PROTOCOL_ERROR),
        ),
        (
            "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
            Seen::Goaway(PROTOCOL_ERROR),
        ),
        ("PING of 7 bytes", Seen::Goaway(PROTOCOL_ERROR)),
        (
            "an HPACK index past the tables",
            Seen::Goaway(PROTOCOL_ERROR),
        ),
        (
            "DATA on a half-closed (remote) stream",
            Seen::Goaway(PROTOCOL_ERROR),
        ),
        ("PRIORITY of 4 bytes", Seen::Goaway(PROTOCOL_ERROR)),
    ];
    deviations
        .into_iter()
        .find(|(case, _)| *case == name)
        .map(|(_, seen)| seen)
}

/// Reads frames until a GOAWAY, a RST_STREAM, our PING's answer, or the end, within `budget`.
/// SETTINGS and other frames are skipped.
async fn next_verdict(tcp: &mut TcpStream, budget: Duration) -> Seen {
    let read = async {
        loop {
            let Ok(frame) = read_frame(tcp).await else {
                return Seen::Closed;
            };
            let code_at = |at: usize| {
                (frame.payload.get(at..at + 4))
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            };
            match frame.kind {
                GOAWAY => return Seen::Goaway(code_at(4)),
                RST_STREAM => return Seen::Reset(frame.stream, code_at(0)),
                PING if frame.flags & ACK != 0 && frame.payload == b"conform!" => {
                    return Seen::PingAnswered
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(budget, read)
        .await
        .unwrap_or(Seen::Nothing)
}

fn satisfied(expect: Expect, seen: &Seen) -> bool {
    match (expect, seen) {
        (Expect::Connection(code), Seen::Goaway(got)) => code == *got,
        (Expect::Stream(stream, code), Seen::Reset(s, got)) => stream == *s && code == *got,
        (Expect::Stream(_, code), Seen::Goaway(got)) => code == *got,
        (Expect::Accepted, Seen::PingAnswered) => true,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_the_errors_rfc_9113_asks_for() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut wrong = Vec::new();
    for (name, bytes, expect) in cases() {
        let mut tcp = raw(&sluice, &[]).await;
        // The PING after the case: answered only if the connection still works.
        let probe = frame(PING, 0, 0, b"conform!");
        let _ = tcp.write_all(&[bytes, probe].concat()).await;
        let seen = verdict(&mut tcp, Duration::from_secs(3)).await;
        if satisfied(expect, &seen) {
            continue;
        }
        match known_deviation(name) {
            Some(known) if known == seen => {
                eprintln!("{name}: the RFC asks {expect:?}; h2 0.4 answers {seen:?}");
            }
            _ => wrong.push(format!("{name}: expected {expect:?}, saw {seen:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Nothing above took the proxy down.
    let reply = sluice.client().await.unary(request("after")).await;
    assert!(reply.is_ok(), "{reply:?}");
    assert!(
        !sluice.log().contains("panicked"),
        "sluice panicked:\n{}",
        sluice.log()
    );
}
