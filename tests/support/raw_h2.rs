//! Hand-made HTTP/2 frames on raw sockets, for tests of hostile or unusual clients.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Sluice;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const ACK: u8 = 0x1;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// One frame as read off a socket.
#[derive(Debug)]
pub struct RawFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads the next whole frame.
pub async fn read_frame(tcp: &mut TcpStream) -> std::io::Result<RawFrame> {
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await?;
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok(RawFrame {
        kind: head[3],
        flags: head[4],
        stream,
        payload,
    })
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `body` as DATA frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE), the last
/// with END_STREAM.
pub fn data_frames(stream: u32, body: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
    let last = chunks.len().saturating_sub(1);
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        out.extend(frame(
            DATA,
            if i == last { END_STREAM } else { 0 },
            stream,
            chunk,
        ));
    }
    out
}

/// An HPACK integer with an `n`-bit prefix (the prefix's other bits zero).
pub fn hpack_int(value: usize, n: u32, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128 + 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A literal header field without indexing, new name, no Huffman coding.
pub fn literal(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    hpack_int(name.len(), 7, out);
    out.extend_from_slice(name.as_bytes());
    hpack_int(value.len(), 7, out);
    out.extend_from_slice(value);
}

/// The header block of a unary echo call, plus `extra` headers.
pub fn request_headers(extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", &b"POST"[..]),
        (":scheme", b"http"),
        (":path", b"/echo.v1.Echo/Unary"),
        (":authority", b"sluice"),
        ("content-type", b"application/grpc"),
        ("te", b"trailers"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        literal(name, value, &mut block);
    }
    block
}

/// A raw connection: the client preface and an empty SETTINGS sent.
pub async fn raw(sluice: &Sluice, settings: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(sluice.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, settings));
    tcp.write_all(&hello).await.unwrap();
    tcp
}

/// Reads frames until one of `kind` arrives (returns its payload) or the connection ends
/// (`None`), at most `budget`.
pub async fn read_until(tcp: &mut TcpStream, kind: u8, budget: Duration) -> Option<(u32, Vec<u8>)> {
    let end = Instant::now() + budget;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, read_frame(tcp))
            .await
            .ok()?
            .ok()?;
        if frame.kind == kind {
            return Some((frame.stream, frame.payload));
        }
    }
}

/// Whether the peer closed: EOF or a reset within `budget`, reading and discarding.
pub async fn closed_within(tcp: &mut TcpStream, budget: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(budget, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// One frame as a raw backend received it: type, flags, stream, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSeen {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub len: usize,
}

/// An HTTP/2 backend written frame by frame, to see exactly which frames the proxy sends:
/// it answers each stream that ends with a trailers-only OK, and reports every stream's
/// frames (HEADERS, CONTINUATION, DATA) once the stream has ended.
pub struct RecordingBackend {
    pub addr: std::net::SocketAddr,
    pub streams: tokio::sync::mpsc::UnboundedReceiver<Vec<FrameSeen>>,
    _listener: super::ScriptedListener,
}

impl RecordingBackend {
    pub async fn start() -> RecordingBackend {
        let (report, streams) = tokio::sync::mpsc::unbounded_channel();
        let listener = super::ScriptedListener::start(move |tcp| {
            let report = report.clone();
            async move {
                let _ = record(tcp, report).await;
            }
        })
        .await;
        RecordingBackend {
            addr: listener.addr,
            streams,
            _listener: listener,
        }
    }
}

async fn record(
    mut tcp: TcpStream,
    report: tokio::sync::mpsc::UnboundedSender<Vec<FrameSeen>>,
) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface).await?;
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut open: std::collections::HashMap<u32, Vec<FrameSeen>> = Default::default();
    loop {
        let RawFrame {
            kind,
            flags,
            stream,
            payload,
        } = read_frame(&mut tcp).await?;
        let len = payload.len();
        if kind == SETTINGS && flags & ACK == 0 {
            tcp.write_all(&frame(SETTINGS, 1, 0, &[])).await?;
        }
        if ![HEADERS, CONTINUATION, DATA].contains(&kind) {
            continue;
        }
        let seen = FrameSeen {
            kind,
            flags,
            stream,
            len,
        };
        open.entry(stream).or_default().push(seen);
        if flags & END_STREAM != 0 {
            let mut block = vec![0x88]; // :status 200, from the static table
            literal("content-type", b"application/grpc", &mut block);
            literal("grpc-status", b"0", &mut block);
            tcp.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, stream, &block))
                .await?;
            let _ = report.send(open.remove(&stream).unwrap_or_default());
        }
    }
}
