//! gRPC-Web's framing (PROTOCOL-WEB.md in grpc/grpc): its content types, the text mode's
//! base64 in both directions (split at any byte), and the trailers sent as the body's last
//! length-prefixed frame, flagged 0x80.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};

/// The flag byte of the frame that carries the trailers.
const TRAILER_FLAG: u8 = 0x80;

/// How a gRPC-Web call's bodies are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/grpc-web` and `application/grpc-web+proto`: the bytes as gRPC frames them.
    Binary,
    /// `application/grpc-web-text` and `application/grpc-web-text+proto`: the same, base64.
    Text,
}

/// A gRPC-Web request's mode and the native content type it becomes upstream; `None` when
/// the content type is not gRPC-Web.
pub fn of_content_type(value: Option<&HeaderValue>) -> Option<(Mode, &'static str)> {
    let value = value?.to_str().ok()?;
    let essence = value.split(';').next()?.trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/grpc-web" => Some((Mode::Binary, "application/grpc")),
        "application/grpc-web+proto" => Some((Mode::Binary, "application/grpc+proto")),
        "application/grpc-web-text" => Some((Mode::Text, "application/grpc")),
        "application/grpc-web-text+proto" => Some((Mode::Text, "application/grpc+proto")),
        _ => None,
    }
}

impl Mode {
    /// The content type of the answer, for a request that came as `request`.
    pub fn answer_content_type(self, request: &HeaderValue) -> HeaderValue {
        let proto = request.as_bytes().windows(6).any(|w| w == b"+proto");
        HeaderValue::from_static(match (self, proto) {
            (Mode::Binary, false) => "application/grpc-web",
            (Mode::Binary, true) => "application/grpc-web+proto",
            (Mode::Text, false) => "application/grpc-web-text",
            (Mode::Text, true) => "application/grpc-web-text+proto",
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::Binary => "grpc-web",
            Mode::Text => "grpc-web-text",
        }
    }
}

/// Decodes a text-mode request body that arrives in pieces split anywhere: each call returns
/// the bytes of the whole 4-character groups seen so far. Padding may end any group (some
/// clients base64 each message on its own).
#[derive(Debug, Default)]
pub struct TextDecoder {
    pending: Vec<u8>,
}

impl TextDecoder {
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, String> {
        self.pending
            .extend(chunk.iter().filter(|b| !b.is_ascii_whitespace()));
        let whole = self.pending.len() / 4 * 4;
        let mut out = Vec::with_capacity(whole / 4 * 3);
        for group in self.pending[..whole].chunks(4) {
            let decoded = STANDARD
                .decode(group)
                .map_err(|e| format!("the grpc-web-text body is not base64: {e}"))?;
            out.extend_from_slice(&decoded);
        }
        self.pending.drain(..whole);
        Ok(Bytes::from(out))
    }

    /// At the end of the body: characters that make no whole group are an error.
    pub fn finish(&self) -> Result<(), String> {
        match self.pending.is_empty() {
            true => Ok(()),
            false => Err("the grpc-web-text body ends inside a base64 group".into()),
        }
    }
}

/// Encodes a text-mode response as one base64 stream: bytes that make no whole 3-byte group
/// wait for the next piece, and only the end is padded.
#[derive(Debug, Default)]
pub struct TextEncoder {
    carry: Vec<u8>,
}

impl TextEncoder {
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.carry.extend_from_slice(chunk);
        let whole = self.carry.len() / 3 * 3;
        let out = STANDARD.encode(&self.carry[..whole]);
        self.carry.drain(..whole);
        Bytes::from(out)
    }

    pub fn finish(&mut self) -> Bytes {
        let out = STANDARD.encode(&self.carry);
        self.carry.clear();
        Bytes::from(out)
    }
}

/// The trailer frame: flag 0x80, the length, then `name: value\r\n` per trailer (names in
/// lower case, as HTTP/2 has them).
pub fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    for (name, value) in trailers {
        block.put_slice(name.as_str().as_bytes());
        block.put_slice(b": ");
        block.put_slice(value.as_bytes());
        block.put_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(TRAILER_FLAG);
    frame.put_u32(block.len() as u32);
    frame.put_slice(&block);
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_map_to_native_ones() {
        let of = |s: &'static str| of_content_type(Some(&HeaderValue::from_static(s)));
        assert_eq!(
            of("application/grpc-web"),
            Some((Mode::Binary, "application/grpc"))
        );
        assert_eq!(
            of("application/grpc-web-text+proto; charset=utf-8"),
            Some((Mode::Text, "application/grpc+proto"))
        );
        assert_eq!(of("application/grpc"), None);
        assert_eq!(of("application/grpc-webx"), None);
    }

    #[test]
    fn text_splits_anywhere_both_ways() {
        let body: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = STANDARD.encode(&body);
        for cut in [1, 2, 3, 5, 7, 64] {
            let mut decoder = TextDecoder::default();
            let mut decoded = Vec::new();
            for piece in text.as_bytes().chunks(cut) {
                decoded.extend_from_slice(&decoder.push(piece).unwrap());
            }
            decoder.finish().unwrap();
            assert_eq!(decoded, body, "cut {cut}");
            let mut encoder = TextEncoder::default();
            let mut encoded = Vec::new();
            for piece in body.chunks(cut) {
                encoded.extend_from_slice(&encoder.push(piece));
            }
            encoded.extend_from_slice(&encoder.finish());
            assert_eq!(encoded, text.as_bytes(), "cut {cut}");
        }
        // Messages encoded one by one, each padded, decode too.
        let mut decoder = TextDecoder::default();
        let both = format!("{}{}", STANDARD.encode(b"ab"), STANDARD.encode(b"cde"));
        assert_eq!(&decoder.push(both.as_bytes()).unwrap()[..], b"abcde");
        assert!(decoder.push(b"!!!!").is_err());
        let mut partial = TextDecoder::default();
        partial.push(b"YW").unwrap();
        assert!(partial.finish().is_err());
    }

    #[test]
    fn trailers_are_the_flagged_last_frame() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        let frame = trailer_frame(&trailers);
        let block = b"grpc-status: 0\r\ngrpc-message: ok\r\n";
        assert_eq!(frame[0], 0x80);
        assert_eq!(&frame[1..5], &(block.len() as u32).to_be_bytes());
        assert_eq!(&frame[5..], block);
    }
}
