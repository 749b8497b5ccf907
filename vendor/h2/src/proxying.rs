//! sluice fork: what a proxy's own HTTP/2 client leg needs from h2 without its connection
//! machinery: the HPACK decoder (to read a backend's answers), and `Error` values that mean
//! what h2's own would (a reset or a GOAWAY, from the peer or from us, or an I/O failure), so
//! code written against h2's errors reads the leg's errors the same way.

use bytes::Bytes;

use crate::frame::StreamId;
use crate::proto;

pub use crate::hpack::{BytesStr, Decoder, DecoderError, Header};

/// The peer reset the stream (RST_STREAM) with `reason`.
pub fn remote_reset(stream_id: u32, reason: crate::Reason) -> crate::Error {
    proto::Error::remote_reset(StreamId::from(stream_id), reason).into()
}

/// We reset the stream with `reason` (a protocol error we found in it).
pub fn library_reset(stream_id: u32, reason: crate::Reason) -> crate::Error {
    proto::Error::library_reset(StreamId::from(stream_id), reason).into()
}

/// The peer sent GOAWAY with `reason`, and this stream was above its last stream id.
pub fn remote_go_away(reason: crate::Reason) -> crate::Error {
    proto::Error::remote_go_away(Bytes::new(), reason).into()
}

/// We closed the connection with GOAWAY and `reason` (a connection error we found).
pub fn library_go_away(reason: crate::Reason) -> crate::Error {
    proto::Error::library_go_away(reason).into()
}

/// The connection's byte stream failed or ended.
pub fn io(error: std::io::Error) -> crate::Error {
    proto::Error::from(error).into()
}
