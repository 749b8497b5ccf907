//! The request side of HPACK (RFC 7541) for a proxy: every field goes out as a literal that is
//! never added to a table, its name indexed in the static table when it is there. Nothing to
//! look up, no state shared between requests, and a backend's decoder gets only what it can
//! read on its own. `:method: POST` and `:scheme` are fully indexed static entries.

use bytes::{BufMut, BytesMut};
use http::header::{HeaderName, HeaderValue};

/// Static table indexes (RFC 7541 Appendix A) of the names a gRPC request carries.
const AUTHORITY: usize = 1;
const PATH: usize = 4;
const METHOD_POST: u8 = 3;
const SCHEME_HTTP: u8 = 6;
const SCHEME_HTTPS: u8 = 7;

/// The static index of a regular header name, for the names requests commonly carry.
/// Compared as `HeaderName`s: a standard name is an enum value, so a miss costs little.
fn static_name(name: &HeaderName) -> Option<usize> {
    use http::header::*;
    let index = if *name == CONTENT_TYPE {
        31
    } else if *name == USER_AGENT {
        58
    } else if *name == ACCEPT_ENCODING {
        16
    } else if *name == AUTHORIZATION {
        23
    } else if *name == CONTENT_LENGTH {
        28
    } else if *name == COOKIE {
        32
    } else if *name == ACCEPT {
        19
    } else {
        return None;
    };
    Some(index)
}

/// An integer with an `n`-bit prefix whose first byte's high bits are `flags`, into `buf`;
/// returns the bytes written (at most 6 for a `u32`-sized value).
fn int_bytes(buf: &mut [u8; 8], flags: u8, n: u32, mut value: usize) -> usize {
    let max = (1usize << n) - 1;
    if value < max {
        buf[0] = flags | value as u8;
        return 1;
    }
    buf[0] = flags | max as u8;
    value -= max;
    let mut len = 1;
    while value >= 128 && len < 7 {
        buf[len] = 0x80 | (value & 0x7f) as u8;
        value >>= 7;
        len += 1;
    }
    buf[len] = value as u8;
    len + 1
}

fn put_int(out: &mut BytesMut, flags: u8, n: u32, value: usize) {
    let mut buf = [0; 8];
    match int_bytes(&mut buf, flags, n, value) {
        // Almost always: one byte, written in place rather than by a `memcpy` call.
        1 => out.put_u8(buf[0]),
        len => out.extend_from_slice(&buf[..len]),
    }
}

/// A string literal, not Huffman-coded.
fn put_str(out: &mut BytesMut, bytes: &[u8]) {
    put_int(out, 0, 7, bytes.len());
    out.extend_from_slice(bytes);
}

/// A field whose name is at `index` in the static table. Never-indexed (0x10) for a value
/// marked sensitive, so intermediaries keep it out of their tables too; else without indexing.
fn put_indexed_name(out: &mut BytesMut, index: usize, value: &[u8], sensitive: bool) {
    put_int(out, if sensitive { 0x10 } else { 0x00 }, 4, index);
    put_str(out, value);
}

/// One regular field.
pub fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    let sensitive = value.is_sensitive();
    let value = value.as_bytes();
    match static_name(name) {
        Some(index) => {
            out.reserve(value.len() + 8);
            put_indexed_name(out, index, value, sensitive);
        }
        None => {
            let name = name.as_str().as_bytes();
            out.reserve(name.len() + value.len() + 12);
            out.put_u8(if sensitive { 0x10 } else { 0x00 });
            put_str(out, name);
            put_str(out, value);
        }
    }
}

/// The request's pseudo-header fields: `:method`, `:scheme`, `:authority` (when the URI has
/// one), `:path`.
pub fn put_request_pseudo(out: &mut BytesMut, method: &http::Method, uri: &http::Uri) {
    if *method == http::Method::POST {
        out.put_u8(0x80 | METHOD_POST);
    } else {
        put_indexed_name(out, 2, method.as_str().as_bytes(), false);
    }
    match uri.scheme_str() {
        Some("https") => out.put_u8(0x80 | SCHEME_HTTPS),
        Some("http") | None => out.put_u8(0x80 | SCHEME_HTTP),
        Some(other) => put_indexed_name(out, 6, other.as_bytes(), false),
    }
    if let Some(authority) = uri.authority() {
        put_indexed_name(out, AUTHORITY, authority.as_str().as_bytes(), false);
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    put_indexed_name(out, PATH, path.as_bytes(), false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// What h2's own decoder reads back from the encoder's bytes.
    fn decode(block: &mut BytesMut) -> Vec<String> {
        let mut decoder = h2::proxying::Decoder::new(4096);
        let mut fields = Vec::new();
        decoder
            .decode(&mut Cursor::new(block), |header| {
                fields.push(format!("{header:?}"));
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        fields
    }

    #[test]
    fn a_request_head_reads_back_as_written() {
        let mut out = BytesMut::new();
        let uri: http::Uri = "http://backend:50051/echo.v1.Echo/Unary".parse().unwrap();
        put_request_pseudo(&mut out, &http::Method::POST, &uri);
        let ct = HeaderValue::from_static("application/grpc");
        put_field(&mut out, &http::header::CONTENT_TYPE, &ct);
        let mut secret = HeaderValue::from_static("00-abc");
        secret.set_sensitive(true);
        put_field(&mut out, &HeaderName::from_static("traceparent"), &secret);
        let long = HeaderValue::from_str(&"x".repeat(300)).unwrap();
        put_field(
            &mut out,
            &HeaderName::from_static("x-long-name-here"),
            &long,
        );
        let fields = decode(&mut out);
        assert_eq!(fields.len(), 7, "{fields:?}");
        assert!(fields[0].contains("POST"));
        assert!(fields[1].contains("http"));
        assert!(fields[2].contains("backend:50051"));
        assert!(fields[3].contains("/echo.v1.Echo/Unary"));
        assert!(fields[4].contains("content-type") && fields[4].contains("application/grpc"));
        assert!(fields[5].contains("traceparent") && fields[5].contains("00-abc"));
        assert!(fields[6].contains(&"x".repeat(300)));
    }
}
