//! Hostile clients against a real sluice, each on a raw socket with hand-made HTTP/2 frames: a
//! header block over the limit, a CONTINUATION flood, a rapid-reset flood, PING and SETTINGS
//! floods, and a zero window that never opens. Each must close the offending connection or
//! keep sluice's memory flat, and a normal call on another connection must still work.

mod support;

use std::time::Duration;

use support::raw_h2::*;
use support::{grpc_frame, request, Echo, Sluice};
use tokio::io::AsyncWriteExt;

async fn still_serves(sluice: &Sluice) {
    let mut client = sluice.client().await;
    let call = tokio::time::timeout(Duration::from_secs(5), client.unary(request("ok"))).await;
    assert!(
        call.is_ok_and(|r| r.is_ok()),
        "a normal call on another connection failed"
    );
}

/// Sluice's resident memory grew by less than 64 MiB during `what`.
fn assert_memory_flat(what: &str, before_kib: u64, after_kib: u64) {
    eprintln!("{what}: RSS {before_kib} KiB -> {after_kib} KiB");
    assert!(
        after_kib < before_kib + 64 * 1024,
        "{what}: RSS grew from {before_kib} KiB to {after_kib} KiB"
    );
}

async fn echo_behind_sluice() -> (Echo, Sluice) {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    (backend, sluice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_over_the_limit_is_refused_and_the_connection_goes_on() {
    let (_backend, sluice) = echo_behind_sluice().await;
    let mut tcp = raw(&sluice, &[]).await;
    // 70 KiB of one header, over the 64 KiB default, in a HEADERS and CONTINUATION frames.
    let big = vec![b'x'; 70 * 1024];
    let block = request_headers(&[("x-big", &big)]);
    let mut chunks = block.chunks(16 * 1024).peekable();
    let first = chunks.next().unwrap();
    let mut bytes = frame(
        HEADERS,
        if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        },
        1,
        first,
    );
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(CONTINUATION, flags, 1, chunk));
    }
    tcp.write_all(&bytes).await.unwrap();
    // HTTP 431 (Request Header Fields Too Large) in a HEADERS frame, then the stream reset.
    let (stream, _) = read_until(&mut tcp, HEADERS, Duration::from_secs(5))
        .await
        .expect("no 431 answer for the oversized request");
    assert_eq!(stream, 1);
    let (stream, payload) = read_until(&mut tcp, RST_STREAM, Duration::from_secs(5))
        .await
        .expect("no RST_STREAM for the oversized request");
    assert_eq!(stream, 1);
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        0x1,
        "PROTOCOL_ERROR"
    );
    // The connection goes on: a normal request on it is answered.
    let mut call = frame(HEADERS, END_HEADERS, 3, &request_headers(&[]));
    call.extend(frame(DATA, END_STREAM, 3, &grpc_frame(&request("after"))));
    tcp.write_all(&call).await.unwrap();
    let (stream, _) = read_until(&mut tcp, HEADERS, Duration::from_secs(5))
        .await
        .expect("no answer after the refused stream");
    assert_eq!(stream, 3);
    still_serves(&sluice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_closes_its_connection() {
    let (_backend, sluice) = echo_behind_sluice().await;
    let mut tcp = raw(&sluice, &[]).await;
    let mut bytes = frame(HEADERS, 0, 1, &request_headers(&[]));
    let filler = vec![0u8; 16 * 1024];
    // Endless CONTINUATION frames that never end the block: up to 4 MiB, stopping when
    // sluice closes the connection.
    let mut sent = 0usize;
    tcp.write_all(&bytes).await.unwrap();
    bytes = frame(CONTINUATION, 0, 1, &filler);
    let write = async {
        while sent < 4 << 20 {
            if tcp.write_all(&bytes).await.is_err() {
                break;
            }
            sent += bytes.len();
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
    assert!(
        closed_within(&mut tcp, Duration::from_secs(5)).await,
        "the flood's connection stayed open"
    );
    still_serves(&sluice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_keeps_memory_flat() {
    let (_backend, sluice) = echo_behind_sluice().await;
    still_serves(&sluice).await;
    let before = sluice.rss_kib();
    let mut tcp = raw(&sluice, &[]).await;
    let block = request_headers(&[]);
    // 5,000 streams, each reset right after its HEADERS, in batches of 100.
    let mut closed_early = false;
    for batch in 0..50u32 {
        let mut bytes = Vec::new();
        for k in 0..100u32 {
            let stream = 1 + 2 * (batch * 100 + k);
            bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
            bytes.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        }
        let wrote = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&bytes)).await;
        if !matches!(wrote, Ok(Ok(()))) {
            closed_early = true;
            break;
        }
    }
    still_serves(&sluice).await;
    let what = format!("rapid reset (closed early: {closed_early})");
    assert_memory_flat(&what, before, sluice.rss_kib());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_keep_memory_flat() {
    let (_backend, sluice) = echo_behind_sluice().await;
    still_serves(&sluice).await;
    let before = sluice.rss_kib();
    for (kind, payload) in [(PING, vec![0u8; 8]), (SETTINGS, vec![])] {
        // Frames that each ask for an answer, while the client reads none of the answers.
        let mut tcp = raw(&sluice, &[]).await;
        let batch: Vec<u8> = (0..1000)
            .flat_map(|_| frame(kind, 0, 0, &payload))
            .collect();
        let flood = async {
            for _ in 0..500 {
                if tcp.write_all(&batch).await.is_err() {
                    break;
                }
            }
        };
        // The writes stall once sluice stops reading (its answers are not read): bounded.
        let _ = tokio::time::timeout(Duration::from_secs(3), flood).await;
        still_serves(&sluice).await;
    }
    assert_memory_flat("PING/SETTINGS floods", before, sluice.rss_kib());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_that_never_opens_keeps_memory_flat() {
    let (_backend, sluice) = echo_behind_sluice().await;
    still_serves(&sluice).await;
    let before = sluice.rss_kib();
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: sluice may send no DATA on any stream.
    let mut tcp = raw(&sluice, &[0, 4, 0, 0, 0, 0]).await;
    let mut ask = request("big");
    ask.payload = vec![7u8; 64 * 1024];
    ask.repeat = 100;
    let block = {
        let mut block = request_headers(&[]);
        let path_at = block
            .windows(19)
            .position(|w| w == b"/echo.v1.Echo/Unary")
            .unwrap();
        block.splice(path_at - 1..path_at + 19, {
            let mut path = Vec::new();
            hpack_int(26, 7, &mut path);
            path.extend_from_slice(b"/echo.v1.Echo/ServerStream");
            path
        });
        block
    };
    // 20 streams, each asking for 100 answers of 64 KiB: 125 MiB that cannot be delivered.
    let mut bytes = Vec::new();
    for k in 0..20u32 {
        let stream = 1 + 2 * k;
        bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
        bytes.extend(data_frames(stream, &grpc_frame(&ask)));
    }
    if let Err(error) = tcp.write_all(&bytes).await {
        panic!("{error}:\n{}", sluice.log());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    still_serves(&sluice).await;
    // Flow control holds it: at most the windows sluice opened to the backend per stream.
    assert_memory_flat("zero window", before, sluice.rss_kib());
    drop(tcp);
}

/// mimalloc asks for transparent huge pages on its regions; where THP is "always", each region a
/// thread touches would cost 2 MiB (93 MiB instead of 52 for 10,000 held streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_runs_without_transparent_huge_pages() {
    let (_backend, sluice) = echo_behind_sluice().await;
    still_serves(&sluice).await;
    let thp = sluice.proc_status("THP_enabled");
    assert_eq!(thp.as_deref(), Some("0"), "THP_enabled in /proc/PID/status");
}
