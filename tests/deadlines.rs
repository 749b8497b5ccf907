//! Deadlines and cancellation (the incident's second fact): the proxy answers
//! DEADLINE_EXCEEDED itself, forwards only the remaining budget, and resets the upstream stream
//! so the backend stops working on a call nobody waits for.

mod support;

use std::time::{Duration, Instant};

use sluice::wire::parse_timeout;
use support::{grpc_frame, request, RawClient, SilentBackend, Sluice, GRPC_HEADERS};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_answers_deadline_exceeded_and_cancels_the_backend() {
    let mut backend = SilentBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    // A raw client: tonic would enforce the deadline itself and race the proxy's answer.
    let mut client = RawClient::connect(sluice.addr).await;
    let headers = [GRPC_HEADERS[0], GRPC_HEADERS[1], ("grpc-timeout", "400m")];
    let started = Instant::now();
    let reply = client
        .call(
            "POST",
            "/echo.v1.Echo/Unary",
            &headers,
            grpc_frame(&request("slow")),
        )
        .await;
    let waited = started.elapsed();

    assert_eq!(reply.status, 200);
    assert!(reply.trailers.is_none(), "a trailers-only reply");
    assert_eq!(reply.grpc_status().as_deref(), Some("4"), "{reply:?}");
    let message = reply.headers["grpc-message"].to_str().unwrap();
    assert!(
        message.starts_with("sluice: deadline exceeded"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_millis(390),
        "answered early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered late: {waited:?}");

    let seen = backend.next_seen(Duration::from_secs(5)).await;
    assert_eq!(
        seen.reset,
        Some(h2::Reason::CANCEL),
        "the backend's stream was not reset"
    );
    let forwarded = parse_timeout(seen.grpc_timeout.as_deref().unwrap().as_bytes()).unwrap();
    assert!(
        forwarded <= Duration::from_millis(400),
        "forwarded {forwarded:?}"
    );
    assert!(
        forwarded > Duration::from_millis(200),
        "forwarded {forwarded:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deadline_applies_when_the_client_sends_none() {
    let mut backend = SilentBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(
        &[backend.addr],
        "    max_deadline: 300ms\n",
    ))
    .await;
    let started = Instant::now();
    let status = sluice
        .client()
        .await
        .unary(request("no deadline"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let seen = backend.next_seen(Duration::from_secs(5)).await;
    let forwarded = parse_timeout(seen.grpc_timeout.as_deref().unwrap().as_bytes()).unwrap();
    assert!(
        forwarded <= Duration::from_millis(300),
        "forwarded {forwarded:?}"
    );
    assert_eq!(seen.reset, Some(h2::Reason::CANCEL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_longer_than_max_deadline_is_capped() {
    let mut backend = SilentBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(
        &[backend.addr],
        "    max_deadline: 300ms\n",
    ))
    .await;
    let mut call = tonic::Request::new(request("long"));
    call.set_timeout(Duration::from_secs(30));
    let status = sluice.client().await.unary(call).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    let seen = backend.next_seen(Duration::from_secs(5)).await;
    let forwarded = parse_timeout(seen.grpc_timeout.as_deref().unwrap().as_bytes()).unwrap();
    assert!(
        forwarded <= Duration::from_millis(300),
        "forwarded {forwarded:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_resets_the_upstream_stream_at_once() {
    let mut backend = SilentBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    let call = tokio::spawn(async move { client.unary(request("abandoned")).await });
    tokio::time::timeout(Duration::from_secs(5), backend.arrivals.recv())
        .await
        .expect("the call reaches the backend");
    let cancelled_at = Instant::now();
    call.abort(); // drops the client's stream: RST_STREAM(CANCEL) to sluice
    let seen = backend.next_seen(Duration::from_secs(5)).await;
    assert_eq!(seen.reset, Some(h2::Reason::CANCEL));
    let delay = seen.reset_at.unwrap() - cancelled_at;
    assert!(
        delay < Duration::from_secs(1),
        "reset reached the backend after {delay:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_backend_sees_its_handler_cancelled_when_the_client_leaves() {
    let backend = support::Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    let mut ask = request("sleepy");
    ask.sleep_ms = 10_000;
    let call = tokio::spawn(async move { client.unary(ask).await });
    let stats = &backend.stats;
    let arrived = support::wait_until(Duration::from_secs(5), || {
        stats.calls.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert!(arrived);
    call.abort();
    let cancelled = support::wait_until(Duration::from_secs(3), || {
        stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert!(
        cancelled,
        "the backend handler kept running after the client left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_timeout_is_an_error_not_a_default() {
    let backend = support::Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut call = tonic::Request::new(request("bad"));
    call.metadata_mut().insert(
        "grpc-timeout",
        tonic::metadata::MetadataValue::from_static("5 seconds"),
    );
    let status = sluice.client().await.unary(call).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("malformed grpc-timeout"),
        "{status:?}"
    );
    assert_eq!(backend.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_connecting_is_deadline_exceeded() {
    let blackhole = support::BlackholeBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(
        &[blackhole.addr],
        "    connect_timeout: 10s\n    max_deadline: 400ms\n",
    ))
    .await;
    let started = Instant::now();
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("while connecting"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_is_retried_then_unavailable() {
    let blackhole = support::BlackholeBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(
        &[blackhole.addr],
        "    connect_timeout: 200ms\n",
    ))
    .await;
    let started = Instant::now();
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("timed out after 200ms"),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
