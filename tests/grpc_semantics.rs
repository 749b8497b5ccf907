//! gRPC semantics carried through sluice end to end: the four call types, big messages,
//! status codes in both forms, metadata and trailers, and the proxy's own error statuses.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{request, Echo, EchoRequest, Sluice};
use tokio_stream::StreamExt;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_types_pass_through() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;

    let unary = client.unary(request("one")).await.unwrap();
    assert_eq!(unary.get_ref().message, "one");
    assert_eq!(unary.metadata().get("x-backend-id").unwrap(), "b1");

    let outbound = tokio_stream::iter((0..5).map(|i| request(&format!("m{i}"))));
    let client_stream = client.client_stream(outbound).await.unwrap().into_inner();
    assert_eq!(
        (client_stream.count, client_stream.message.as_str()),
        (5, "m4")
    );

    let mut ask = request("many");
    ask.repeat = 7;
    let mut server_stream = client.server_stream(ask).await.unwrap().into_inner();
    let mut received = Vec::new();
    while let Some(message) = server_stream.next().await {
        received.push(message.unwrap().count);
    }
    assert_eq!(received, (1..=7).collect::<Vec<_>>());

    let outbound = tokio_stream::iter((0..10).map(|i| request(&format!("b{i}"))));
    let mut bidi = client.bidi(outbound).await.unwrap().into_inner();
    let mut echoed = Vec::new();
    while let Some(message) = bidi.next().await {
        echoed.push(message.unwrap().message);
    }
    assert_eq!(echoed, (0..10).map(|i| format!("b{i}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_message_goes_both_ways() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    let payload: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let ask = EchoRequest {
        payload: payload.clone(),
        ..Default::default()
    };
    let response = client.unary(ask).await.unwrap().into_inner();
    assert_eq!(response.payload.len(), payload.len());
    assert!(response.payload == payload, "payload changed in transit");
}

/// Every non-OK code with a unicode message, as trailers-only (unary error) and after headers
/// and a message (server stream), with a custom trailer and status details intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_code_passes_through_in_both_forms() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    for code in 1..=16 {
        let message = format!("échec ✗ {code} — 100% \"quoted\"");
        let mut ask = request("x");
        ask.fail_code = code;
        ask.fail_message = message.clone();

        let status = client.unary(ask.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::from(code),
            "trailers-only, code {code}"
        );
        assert_eq!(status.message(), message);
        assert_eq!(status.metadata().get("x-trailer").unwrap(), "custom");
        assert_eq!(
            status.details(),
            sluice::demo::status_details(code, &message)
        );

        ask.fail_after_headers = true;
        let mut stream = client.server_stream(ask).await.unwrap().into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().message, "x");
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            Code::from(code),
            "after headers, code {code}"
        );
        assert_eq!(status.message(), message);
        assert_eq!(status.metadata().get("x-trailer").unwrap(), "custom");
        assert_eq!(
            status.details(),
            sluice::demo::status_details(code, &message)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_text_metadata_pass_both_ways() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    let mut call = tonic::Request::new(request("meta"));
    let binary = [0u8, 1, 2, 254, 255];
    call.metadata_mut()
        .insert("x-text", MetadataValue::from_static("plain value"));
    call.metadata_mut()
        .insert_bin("x-blob-bin", BinaryMetadataValue::from_bytes(&binary));
    let response = client.unary(call).await.unwrap();
    assert_eq!(response.metadata().get("x-text").unwrap(), "plain value");
    let echoed = response.metadata().get_bin("x-blob-bin").unwrap();
    assert_eq!(echoed.to_bytes().unwrap().as_ref(), binary);
}

/// The incident's first fact: one long-lived connection must still reach every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_one_connection_spread_over_all_backends() {
    let (_backends, sluice) = Echo::three_behind_sluice().await;
    let mut client = sluice.client().await;
    let mut per_backend: HashMap<String, u32> = HashMap::new();
    for i in 0..300 {
        let reply = client.unary(request(&format!("{i}"))).await.unwrap();
        *per_backend
            .entry(reply.into_inner().backend_id)
            .or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    for (backend, count) in &per_backend {
        assert!(
            *count >= 30,
            "{backend} got only {count} of 300: {per_backend:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_is_unimplemented() {
    let backend = Echo::start("b1").await;
    let routes = "routes:\n  - match: { service: \"other.v1.Other\" }\n    cluster: echo\n";
    let sluice = Sluice::start(&format!("{}{routes}", Sluice::cluster(&[backend.addr], ""))).await;
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(
        status
            .message()
            .contains("no route for /echo.v1.Echo/Unary"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_route_and_catch_all_pick_clusters_in_order() {
    let first = Echo::start("first").await;
    let second = Echo::start("second").await;
    let config = format!(
        "clusters:\n  - name: a\n    discovery: {{ static: [\"{}\"] }}\n  - name: b\n    discovery: {{ static: [\"{}\"] }}\n\
         routes:\n  - match: {{ prefix: \"/echo.v1.Echo/Unary\" }}\n    cluster: b\n  - cluster: a\n",
        first.addr, second.addr
    );
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    let unary = client.unary(request("x")).await.unwrap().into_inner();
    assert_eq!(unary.backend_id, "second");
    let streamed = client
        .client_stream(tokio_stream::iter([request("y")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(streamed.backend_id, "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_reachable_is_unavailable_not_a_bare_http_error() {
    let dead = support::RefusedAddrs::new(2);
    let sluice = Sluice::start(&Sluice::cluster(
        &dead.addrs,
        "    connect_timeout: 200ms\n",
    ))
    .await;
    let started = std::time::Instant::now();
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("sluice: connect to 127.0.0.1:"),
        "{status:?}"
    );
    assert!(status.message().contains("after 2 attempts"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_ended_by_an_empty_data_frame_reaches_the_backend_in_one_data_frame() {
    use support::raw_h2::*;
    use tokio::io::AsyncWriteExt;
    let mut backend = RecordingBackend::start().await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    // As tonic ends a unary request: the message, then an empty DATA frame with END_STREAM,
    // here in one write so both have arrived when sluice forwards the message. sluice puts
    // END_STREAM on the message's own frame: one frame fewer, and the backend sees the
    // request end where the message does.
    let mut tcp = raw(&sluice, &[]).await;
    let bytes = [
        frame(HEADERS, END_HEADERS, 1, &request_headers(&[])),
        frame(DATA, 0, 1, &support::grpc_frame(&request("one"))),
        frame(DATA, END_STREAM, 1, &[]),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    let frames = tokio::time::timeout(Duration::from_secs(5), backend.streams.recv())
        .await
        .expect("the backend saw the stream end")
        .expect("the backend is running");
    let kinds: Vec<(u8, u8)> = frames
        .iter()
        .map(|f| (f.kind, f.flags & END_STREAM))
        .collect();
    assert_eq!(kinds, [(HEADERS, 0), (DATA, END_STREAM)], "{frames:?}");
    assert!(frames[1].len > 5, "{frames:?}");
}
