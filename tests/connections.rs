//! A listener's connection policy, against a real sluice with raw HTTP/2 clients:
//! `max_connection_age` (GOAWAY, and the open stream finishes), its grace, the idle timeout,
//! the PING policy (GOAWAY ENHANCE_YOUR_CALM), and server PINGs that find a dead client.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use support::raw_h2::{closed_within, frame, raw, read_until, GOAWAY, PING};
use support::{grpc_frame, request, Echo, Sluice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A raw HTTP/2 connection to sluice: its sender, and the task driving it (which ends, with
/// the reason, when the connection does).
async fn connect(sluice: &Sluice) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(sluice.addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    (sender, tokio::spawn(connection))
}

/// Sends a unary echo call that the backend holds `held_ms`; `None` when the connection
/// takes no new stream (closed, or after GOAWAY).
async fn send_call(sender: &SendRequest<Bytes>, held_ms: u32) -> Option<ResponseFuture> {
    let request = http::Request::post("http://sluice/echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let mut ready = sender.clone().ready().await.ok()?;
    let (response, mut body) = ready.send_request(request, false).ok()?;
    let ask = request_held(held_ms);
    body.send_data(Bytes::from(grpc_frame(&ask)), true).ok()?;
    Some(response)
}

/// Starts a unary echo call that the backend holds `held_ms`; resolves to its grpc-status
/// (`None` if the stream or connection failed first).
async fn start_call(sender: &SendRequest<Bytes>, held_ms: u32) -> JoinHandle<Option<String>> {
    let response = send_call(sender, held_ms)
        .await
        .expect("a new stream on the connection");
    tokio::spawn(async move {
        let response = response.await.ok()?;
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.ok()??;
        Some(trailers.get("grpc-status")?.to_str().ok()?.to_string())
    })
}

fn request_held(held_ms: u32) -> support::EchoRequest {
    support::EchoRequest {
        sleep_ms: held_ms,
        ..request("held")
    }
}

async fn sluice_with(listener: &str) -> (Echo, Sluice) {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start_with_listener(listener, &Sluice::cluster(&[backend.addr], "")).await;
    (backend, sluice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_sends_goaway_and_the_open_stream_finishes() {
    let (_backend, sluice) = sluice_with("    max_connection_age: 1s\n").await;
    let (sender, connection) = connect(&sluice).await;
    let started = Instant::now();
    let held = start_call(&sender, 2_000).await;
    // GOAWAY came at 0.9-1.1 s: the client may open no new stream on this connection.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let refused = match sender.clone().ready().await {
        Err(_) => true,
        Ok(mut ready) => {
            let request = http::Request::post("http://sluice/echo.v1.Echo/Unary")
                .body(())
                .unwrap();
            ready.send_request(request, true).is_err()
        }
    };
    assert!(
        refused,
        "a new stream was accepted after max_connection_age"
    );
    assert_eq!(
        held.await.unwrap().as_deref(),
        Some("0"),
        "the open stream did not finish"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    // Then the connection closes, cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        ended.is_ok_and(|r| r.unwrap().is_ok()),
        "the connection did not close after its last stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_the_connection_closes_with_streams_still_open() {
    let listener = "    max_connection_age: 1s\n    max_connection_age_grace: 1s\n";
    let (_backend, sluice) = sluice_with(listener).await;
    let (sender, connection) = connect(&sluice).await;
    let started = Instant::now();
    let held = start_call(&sender, 10_000).await;
    let status = tokio::time::timeout(Duration::from_secs(6), held).await;
    let status = status
        .expect("the held call outlived max_connection_age + grace")
        .unwrap();
    assert_ne!(status.as_deref(), Some("0"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_goaway_after_the_idle_timeout() {
    let (_backend, sluice) = sluice_with("    keepalive: { idle_timeout: 1s }\n").await;
    let (_sender, connection) = connect(&sluice).await;
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), connection).await;
    assert!(ended.is_ok(), "the idle connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The default (an hour) keeps it open.
    let (_backend, patient) = sluice_with("").await;
    let (_sender, connection) = connect(&patient).await;
    let ended = tokio::time::timeout(Duration::from_secs(3), connection).await;
    assert!(ended.is_err(), "closed without an idle timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pings_too_often_gets_enhance_your_calm() {
    let (_backend, sluice) = sluice_with("").await;
    let mut tcp = raw(&sluice, &[]).await;
    // No stream open, so each PING is a strike; the third one trips the policy.
    let pings: Vec<u8> = (0..4u8).flat_map(|k| frame(PING, 0, 0, &[k; 8])).collect();
    tcp.write_all(&pings).await.unwrap();
    let (_, goaway) = read_until(&mut tcp, GOAWAY, Duration::from_secs(5))
        .await
        .expect("no GOAWAY after too many PINGs");
    let code = u32::from_be_bytes(goaway[4..8].try_into().unwrap());
    assert_eq!(code, 0xb, "GOAWAY code {code:#x}, not ENHANCE_YOUR_CALM");
    // grpc-go's debug data, which its clients log and act on (they double their interval).
    assert_eq!(&goaway[8..], b"too_many_pings");
    assert!(closed_within(&mut tcp, Duration::from_secs(5)).await);
    // Within the policy, the same PINGs are answered and the connection stays.
    let listener = "    keepalive: { min_ping_interval: 1ms, permit_without_stream: true }\n";
    let (_backend, lenient) = sluice_with(listener).await;
    let mut tcp = raw(&lenient, &[]).await;
    for k in 0..4u8 {
        // Paced 10 ms apart, slower than the 1 ms the policy asks for.
        tcp.write_all(&frame(PING, 0, 0, &[k; 8])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(read_until(&mut tcp, GOAWAY, Duration::from_secs(1))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_pings_is_closed() {
    let listener = "    keepalive: { ping_interval: 1s, ping_timeout: 1s }\n";
    let (_backend, sluice) = sluice_with(listener).await;
    // A client that sends the preface and its SETTINGS, then reads but answers nothing.
    let mut tcp = TcpStream::connect(sluice.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "sluice kept a connection whose client never answered a PING"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
}

/// A connection that has served one call, or `None` when sluice closed it.
async fn served(
    sluice: &Sluice,
) -> Option<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>)> {
    let tcp = TcpStream::connect(sluice.addr).await.ok()?;
    let (sender, connection) = h2::client::handshake(tcp).await.ok()?;
    let connection = tokio::spawn(connection);
    let response = send_call(&sender, 0).await?;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .ok()?
        .ok()?;
    (response.status() == 200).then_some((sender, connection))
}

/// A connection that serves, retrying a few times: at start, sluice's own readiness probe may
/// hold a slot for a moment.
async fn served_soon(sluice: &Sluice) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    for _ in 0..50 {
        if let Some(served) = served(sluice).await {
            return served;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection was served:\n{}", sluice.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed_on_arrival() {
    let (_backend, sluice) = sluice_with("    max_connections: 2\n").await;
    let (_first, first_connection) = served_soon(&sluice).await;
    let (_second, _second_connection) = served_soon(&sluice).await;
    // With two open, a third is closed as soon as it arrives.
    let mut third = TcpStream::connect(sluice.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection was served: {read:?}"
    );
    let metrics = sluice.metrics().await;
    let refused = "sluice_downstream_connections_refused_total{listener=\"grpc\"}";
    assert!(metrics.contains(refused), "{metrics}");
    assert!(
        sluice.log().contains("max_connections reached"),
        "{}",
        sluice.log()
    );
    // One closes; a new one is served again.
    first_connection.abort();
    drop(_first);
    served_soon(&sluice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_calls_keep_a_connection_out_of_the_idle_timeout() {
    let (_backend, sluice) = sluice_with("    keepalive: { idle_timeout: 2s }\n").await;
    let (sender, connection) = connect(&sluice).await;
    // A 1 ms call every 300 ms for 4 s: never a call open when the 1 s tick looks, never idle.
    for _ in 0..13 {
        let status = start_call(&sender, 0).await.await.unwrap();
        assert_eq!(status.as_deref(), Some("0"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!connection.is_finished(), "GOAWAY while calls kept coming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_inside_its_preface_is_closed() {
    let (_backend, sluice) = sluice_with("").await;
    let mut tcp = TcpStream::connect(sluice.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let started = Instant::now();
    // sluice's own SETTINGS may arrive first; then the connection must end.
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after 15 s");
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}
