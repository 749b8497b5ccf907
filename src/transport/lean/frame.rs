//! HTTP/2 frames as bytes (RFC 9113 §4 and §6): the 9-byte header, the frames the client leg
//! writes, and the parts of received frames it reads. Nothing here keeps state.

use bytes::{BufMut, BytesMut};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const HEADER_LEN: usize = 9;
/// RFC 9113 §6.9.1: the largest window.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The window every stream and the connection start with.
pub const DEFAULT_WINDOW: i64 = 65_535;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// SETTINGS identifiers (RFC 9113 §6.5.2).
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// A received frame's header.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// Reads the header at the start of `buf`, which holds at least `HEADER_LEN` bytes.
    pub fn parse(buf: &[u8]) -> Head {
        Head {
            len: (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]),
            kind: buf[3],
            flags: buf[4],
            stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
        }
    }
}

/// Writes a frame header for a payload of `len` bytes.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.reserve(HEADER_LEN + len);
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

pub fn put_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, SETTINGS, 0, 0);
    for (id, value) in settings {
        out.put_u16(*id);
        out.put_u32(*value);
    }
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

pub fn put_rst_stream(out: &mut BytesMut, stream: u32, reason: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(reason);
}

pub fn put_ping(out: &mut BytesMut, ack: bool, payload: [u8; 8]) {
    put_head(out, 8, PING, if ack { ACK } else { 0 }, 0);
    out.put_slice(&payload);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, reason: u32) {
    put_head(out, 8, GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(reason);
}

/// A padded frame's payload without its padding (RFC 9113 §6.1): `None` when the pad length
/// does not fit, a connection error.
pub fn unpad(payload: &[u8], flags: u8) -> Option<(usize, usize)> {
    if flags & PADDED == 0 {
        return Some((0, payload.len()));
    }
    let pad = usize::from(*payload.first()?);
    let end = payload.len().checked_sub(pad)?;
    (end >= 1).then_some((1, end))
}
