//! An upstream connection's bytes to write, in order, until its task writes them in one
//! `writev`: frame headers and small payloads copied into one buffer, large DATA payloads
//! kept as the `Bytes` they came in.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes to write, in order: frame headers and small payloads in `pending`, large DATA
/// payloads as their own `Bytes` (no copy), each behind the bytes that precede it.
#[derive(Debug, Default)]
pub struct Output {
    chunks: VecDeque<Bytes>,
    pending: BytesMut,
}

/// A DATA payload up to this size is copied behind its frame header: one iovec instead of
/// two, for less than the cost of tracking a second buffer.
const COPY_BELOW: usize = 1024;

impl Output {
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.pending
    }

    /// Queues a DATA payload behind what is queued (its frame header, last).
    pub fn push_payload(&mut self, payload: Bytes) {
        if payload.len() < COPY_BELOW {
            self.pending.put_slice(&payload);
            return;
        }
        if !self.pending.is_empty() {
            self.chunks.push_back(self.pending.split().freeze());
        }
        self.chunks.push_back(payload);
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.pending.is_empty()
    }

    /// Fills `slices` with what is queued, in order; returns how many.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for chunk in &self.chunks {
            if n == slices.len() {
                return n;
            }
            slices[n] = IoSlice::new(chunk);
            n += 1;
        }
        if n < slices.len() && !self.pending.is_empty() {
            slices[n] = IoSlice::new(&self.pending);
            n += 1;
        }
        n
    }

    /// `written` bytes went out.
    pub fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.pending.advance(written);
                return;
            };
            if front.len() > written {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `slices` offers, flattened.
    fn queued(output: &Output) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 8];
        let n = output.slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn bytes_leave_in_the_order_they_were_queued_whatever_was_written() {
        let mut output = Output::default();
        output.buf().put_slice(b"head1");
        output.push_payload(Bytes::from_static(b"small"));
        output.buf().put_slice(b"head2");
        let large = Bytes::from(vec![b'L'; COPY_BELOW]);
        output.push_payload(large.clone());
        output.buf().put_slice(b"tail");
        let mut expected = b"head1smallhead2".to_vec();
        expected.extend_from_slice(&large);
        expected.extend_from_slice(b"tail");
        assert_eq!(queued(&output), expected);
        // Partial writes, across the boundaries.
        for written in [3, 20, COPY_BELOW - 6, 2] {
            output.advance(written);
            expected.drain(..written);
            assert_eq!(queued(&output), expected);
        }
        output.advance(expected.len());
        assert!(output.is_empty());
    }
}
