//! Legal HTTP/2 framing that tonic clients never produce, through a real sluice to a real
//! backend: a header block split over CONTINUATION frames, padded HEADERS and DATA, PRIORITY
//! frames and the HEADERS priority flag, and a client window opened a few bytes at a time.
//! Each call must come back whole. With the h2 conformance cases, these pin what the listener
//! accepts, before and after any change to the HTTP/2 path.

mod support;

use std::time::Duration;

use support::raw_h2::*;
use support::{grpc_frame, request, Echo, Sluice};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn echo_behind_sluice() -> (Echo, Sluice) {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    (backend, sluice)
}

/// Reads stream 1's response: the DATA bytes until the trailers (HEADERS with END_STREAM).
/// With `window_step`, every DATA frame is answered with WINDOW_UPDATEs of that many bytes
/// (the first SETTINGS made the window tiny); otherwise the default window suffices.
async fn response_body(tcp: &mut TcpStream, window_step: Option<u32>) -> Vec<u8> {
    let mut body = Vec::new();
    let read = async {
        loop {
            let RawFrame {
                kind,
                flags,
                stream,
                payload,
            } = read_frame(tcp).await.expect("a frame");
            let len = payload.len();
            match (kind, stream) {
                (SETTINGS, 0) if flags & ACK == 0 => {
                    tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                }
                (DATA, 1) => {
                    body.extend_from_slice(&payload);
                    if let Some(step) = window_step {
                        let mut opened = 0;
                        while opened < len as u32 {
                            let n = step.min(len as u32 - opened);
                            let update = n.to_be_bytes();
                            let bytes = [
                                frame(WINDOW_UPDATE, 0, 1, &update),
                                frame(WINDOW_UPDATE, 0, 0, &update),
                            ]
                            .concat();
                            tcp.write_all(&bytes).await.unwrap();
                            opened += n;
                        }
                    }
                }
                (HEADERS, 1) if flags & END_STREAM != 0 => return,
                (GOAWAY | RST_STREAM, _) => panic!("the call failed: frame type {kind}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the response arrives");
    body
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_split_over_continuation_frames_is_reassembled() {
    let (_backend, sluice) = echo_behind_sluice().await;
    let mut tcp = raw(&sluice, &[]).await;
    let value = vec![b'v'; 3000];
    let block = request_headers(&[("x-long", &value)]);
    // One HEADERS and four CONTINUATION frames. More than max_header_list_size /
    // max_frame_size + 25% (at least 5) is taken for a CONTINUATION flood and ends the
    // connection with ENHANCE_YOUR_CALM (tests/hostile.rs).
    let pieces: Vec<&[u8]> = block.chunks(block.len().div_ceil(5)).collect();
    assert_eq!(pieces.len(), 5);
    let mut bytes = frame(HEADERS, 0, 1, pieces[0]);
    for (i, piece) in pieces.iter().enumerate().skip(1) {
        let last = i == pieces.len() - 1;
        bytes.extend(frame(
            CONTINUATION,
            if last { END_HEADERS } else { 0 },
            1,
            piece,
        ));
    }
    bytes.extend(frame(
        DATA,
        END_STREAM,
        1,
        &grpc_frame(&request("continued")),
    ));
    tcp.write_all(&bytes).await.unwrap();
    assert!(contains(&response_body(&mut tcp, None).await, b"continued"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_headers_and_data_are_accepted() {
    let (_backend, sluice) = echo_behind_sluice().await;
    let mut tcp = raw(&sluice, &[]).await;
    let mut headers = vec![7u8];
    headers.extend(request_headers(&[]));
    headers.extend([0u8; 7]);
    let mut data = vec![200u8];
    data.extend(grpc_frame(&request("padded")));
    data.extend([0u8; 200]);
    let bytes = [
        frame(HEADERS, END_HEADERS | PADDED, 1, &headers),
        frame(DATA, END_STREAM | PADDED, 1, &data),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    assert!(contains(&response_body(&mut tcp, None).await, b"padded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_frames_and_the_priority_flag_change_nothing() {
    let (_backend, sluice) = echo_behind_sluice().await;
    let mut tcp = raw(&sluice, &[]).await;
    // Exclusive dependency on stream 0, weight 200, on HEADERS; then PRIORITY frames for the
    // open stream and for an idle one.
    let mut headers = vec![0x80, 0, 0, 0, 200];
    headers.extend(request_headers(&[]));
    let bytes = [
        frame(PRIORITY, 0, 3, &[0, 0, 0, 0, 16]),
        frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, &headers),
        frame(PRIORITY, 0, 1, &[0, 0, 0, 3, 32]),
        frame(DATA, END_STREAM, 1, &grpc_frame(&request("prioritised"))),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    assert!(contains(
        &response_body(&mut tcp, None).await,
        b"prioritised"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_opened_a_few_bytes_at_a_time_gets_the_whole_response() {
    let (_backend, sluice) = echo_behind_sluice().await;
    // SETTINGS_INITIAL_WINDOW_SIZE = 7: sluice may send 7 bytes of DATA, then waits for the
    // client's WINDOW_UPDATEs, which come 5 bytes at a time.
    let mut tcp = raw(&sluice, &[0, 4, 0, 0, 0, 7]).await;
    let message = "odd-window-".repeat(20);
    let bytes = [
        frame(HEADERS, END_HEADERS, 1, &request_headers(&[])),
        frame(DATA, END_STREAM, 1, &grpc_frame(&request(&message))),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    let body = response_body(&mut tcp, Some(5)).await;
    assert!(contains(&body, message.as_bytes()), "{} bytes", body.len());
}
