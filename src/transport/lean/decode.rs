//! Response header blocks into `Decoded` heads, with h2's HPACK decoder (exposed by sluice's
//! fork). A gRPC backend answers every call on a connection with the same two blocks once its
//! encoder has them in its table: `:status: 200` with the content type, then `grpc-status: 0`,
//! each a few one-byte references to table entries. Such a block changes nothing in the
//! decoder's table, so while the table is unchanged the same bytes mean the same head: the
//! last few are kept and cloned instead of decoded again.

use std::io::Cursor;
use std::ops::ControlFlow;

use bytes::{Bytes, BytesMut};
use h2::proxying::Header;
use http::header::{HeaderName, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};

use super::state::Decoded;

/// How many recent blocks are kept: response headers and trailers, with room for a second
/// kind of answer.
const RECENT: usize = 4;
/// Longer blocks are not kept: they are not the everyday answer.
const RECENT_MAX_LEN: usize = 32;

/// The connection's HPACK decoder, and its recent answers.
pub struct Decoder {
    hpack: h2::proxying::Decoder,
    recent: Vec<(Bytes, Decoded)>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            hpack: h2::proxying::Decoder::new(4096),
            recent: Vec::with_capacity(RECENT),
        }
    }
}

/// True when every byte of `block` is a one-byte indexed field (RFC 7541 §6.1, index 1 to
/// 126): decoding it reads the table and changes nothing.
fn only_indexed(block: &[u8]) -> bool {
    block.iter().all(|byte| (0x81..=0xfe).contains(byte))
}

impl Decoder {
    /// Decodes a whole header block; `None` when it is not valid HPACK (a connection error).
    pub fn decode(&mut self, block: &mut BytesMut) -> Option<Decoded> {
        let reusable = block.len() <= RECENT_MAX_LEN && only_indexed(block);
        if reusable {
            if let Some((_, decoded)) = self.recent.iter().find(|(bytes, _)| bytes[..] == block[..])
            {
                return Some(decoded.clone());
            }
        } else {
            // The table may change: what the recent blocks meant may no longer hold.
            self.recent.clear();
        }
        let bytes = reusable.then(|| Bytes::copy_from_slice(block));
        // Decoded values are slices of the block they came from, and the table keeps some:
        // a copy of its own keeps them from pinning the connection's whole read buffer.
        let mut own = BytesMut::from(&block[..]);
        let decoded = decode(&mut self.hpack, &mut own)?;
        if let Some(bytes) = bytes {
            if self.recent.len() == RECENT {
                self.recent.remove(0);
            }
            self.recent.push((bytes, decoded.clone()));
        }
        Some(decoded)
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn decode(decoder: &mut h2::proxying::Decoder, block: &mut BytesMut) -> Option<Decoded> {
    let mut decoded = Decoded::default();
    let mut fields = 0;
    let result = decoder.decode(&mut Cursor::new(block), |header| {
        match header {
            Header::Field { name, value } => {
                let connection_specific = name == CONNECTION
                    || name == TRANSFER_ENCODING
                    || name == UPGRADE
                    || name == KEEP_ALIVE
                    || name == PROXY_CONNECTION
                    || (name == TE && value != "trailers");
                decoded.malformed |= connection_specific;
                decoded.headers.append(name, value);
                fields += 1;
            }
            Header::Status(status) if fields == 0 && decoded.status.is_none() => {
                decoded.status = Some(status);
            }
            _ => decoded.malformed = true,
        }
        ControlFlow::Continue(())
    });
    result.ok().map(|()| decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A literal field with incremental indexing (RFC 7541 §6.2.1), new name: it goes into
    /// the table at index 62.
    fn indexed_literal(name: &str, value: &str) -> Vec<u8> {
        let mut block = vec![0x40, name.len() as u8];
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
        block
    }

    fn decode_bytes(decoder: &mut Decoder, bytes: &[u8]) -> Decoded {
        decoder.decode(&mut BytesMut::from(bytes)).unwrap()
    }

    #[test]
    fn a_repeated_block_means_what_the_table_says_now() {
        let mut decoder = Decoder::default();
        decode_bytes(&mut decoder, &indexed_literal("x-answer", "first"));
        // `:status: 200` and table entry 62: reusable.
        let reference = [0x88, 0xbe];
        let first = decode_bytes(&mut decoder, &reference);
        assert_eq!(first.status, Some(http::StatusCode::OK));
        assert_eq!(first.headers["x-answer"], "first");
        assert_eq!(
            decode_bytes(&mut decoder, &reference).headers["x-answer"],
            "first"
        );
        // A new entry takes index 62: the same bytes now name it.
        decode_bytes(&mut decoder, &indexed_literal("x-answer", "second"));
        assert_eq!(
            decode_bytes(&mut decoder, &reference).headers["x-answer"],
            "second"
        );
    }

    #[test]
    fn a_status_after_a_field_or_a_connection_header_is_malformed() {
        let mut decoder = Decoder::default();
        // `content-type` (a static name), then `:status: 200`.
        let late_status = [0x0f, 0x10, 0x01, b'x', 0x88];
        assert!(decode_bytes(&mut decoder, &late_status).malformed);
        let connection = [&[0x88][..], &indexed_literal("connection", "close")].concat();
        assert!(decode_bytes(&mut decoder, &connection).malformed);
        assert!(
            decoder.decode(&mut BytesMut::from(&[0x80][..])).is_none(),
            "index 0"
        );
    }
}
