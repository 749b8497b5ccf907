//! Backends that die, refuse, or slow down: callers must not notice more than they must.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{request, Echo, EchoProcess, GoawayBackend, RefusingBackend, Sluice};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_a_backend_is_killed_all_succeed() {
    let (mut backends, sluice) = EchoProcess::three_behind_sluice("").await;
    let mut client = sluice.client().await;
    // Warm up: every backend has a pooled connection when the kill comes.
    let mut seen = HashMap::<String, u32>::new();
    for i in 0..60 {
        let reply = client.unary(request(&format!("warm {i}"))).await.unwrap();
        *seen.entry(reply.into_inner().backend_id).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    backends[1].kill();
    // Wait until sluice has read the dead connection's EOF (microseconds in practice): this
    // test is about the calls after that; a call sent on it before then is retried (the tests
    // below).
    let noticed = sluice.wait_no_connections(backends[1].addr).await;
    assert!(
        noticed,
        "sluice never noticed the killed backend's connection close"
    );
    let mut after = HashMap::<String, u32>::new();
    for i in 0..100 {
        match client.unary(request(&format!("after {i}"))).await {
            Ok(reply) => *after.entry(reply.into_inner().backend_id).or_default() += 1,
            Err(status) => panic!("call {i} after the kill failed: {status:?}"),
        }
    }
    assert!(!after.contains_key("b2"), "{after:?}");
    assert_eq!(after.values().sum::<u32>(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_between_calls_costs_no_call() {
    // The next call comes at once, before sluice's connection driver has read the EOF: the
    // dead connection must not be lent (round robin picks the killed backend within 3 calls).
    for round in 0..5 {
        let mut backends = [
            EchoProcess::start("b1").await,
            EchoProcess::start("b2").await,
            EchoProcess::start("b3").await,
        ];
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let config = Sluice::cluster(&addrs, "    balancer: round_robin\n");
        let sluice = Sluice::start(&config).await;
        let mut client = sluice.client().await;
        for i in 0..6 {
            client.unary(request(&format!("warm {i}"))).await.unwrap();
        }
        backends[1].kill();
        for i in 0..6 {
            if let Err(status) = client.unary(request(&format!("after {i}"))).await {
                panic!("round {round}, call {i} after the kill failed: {status:?}");
            }
        }
    }
}

/// The check: SIGKILL one of three backends between calls, then send calls at once;
/// 20 rounds, the killed backend restarted on its address after each. Returns the failures.
async fn kill_between_calls(callers: usize, calls_each: usize) -> Vec<String> {
    let (mut backends, sluice) = EchoProcess::three_behind_sluice("").await;
    let ids = ["b1", "b2", "b3"];
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(sluice.client().await);
    }
    let mut failures = Vec::new();
    for round in 0..20 {
        let victim = round % 3;
        // Every backend serves (has a pooled connection) when the kill comes.
        let all_serving = wait_all_serving(&mut clients[0], &ids).await;
        assert!(
            all_serving,
            "round {round}: not every backend served within 15 s"
        );
        backends[victim].kill();
        let mut tasks = Vec::new();
        for mut client in clients.drain(..) {
            tasks.push(tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..calls_each {
                    if let Err(status) = client.unary(request(&format!("after {i}"))).await {
                        failed.push(format!("{status:?}"));
                    }
                }
                (client, failed)
            }));
        }
        for task in tasks {
            let (client, failed) = task.await.unwrap();
            clients.push(client);
            failures.extend(failed.into_iter().map(|f| format!("round {round}: {f}")));
        }
        let addr = backends[victim].addr;
        backends[victim] = EchoProcess::start_on(ids[victim], addr).await;
    }
    failures
}

/// Calls until every one of `ids` has answered one (bounded: 15 s).
async fn wait_all_serving(
    client: &mut sluice::demo::pb::echo_client::EchoClient<tonic::transport::Channel>,
    ids: &[&str],
) -> bool {
    let mut seen = std::collections::HashSet::new();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < ids.len() && std::time::Instant::now() < end {
        if let Ok(reply) = client.unary(request("warm")).await {
            seen.insert(reply.into_inner().backend_id);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen.len() == ids.len()
}

/// A backend whose process dies `after` each request arrives: it reads the request headers,
/// then its connection closes without a byte of response. Counts the requests it got.
async fn dying_backend(after: Duration) -> (support::ScriptedListener, Arc<AtomicU64>) {
    let received = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&received);
    let listener = support::ScriptedListener::start(move |tcp| {
        let seen = Arc::clone(&seen);
        async move {
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                return;
            };
            if let Some(Ok(_request)) = connection.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(after).await;
            }
            // Dropping the connection closes the socket: the backend is gone.
        }
    })
    .await;
    (listener, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_connection_dies_before_any_response_byte_is_retried_elsewhere() {
    let (dying, received) = dying_backend(Duration::ZERO).await;
    let good = Echo::start("good").await;
    let extra = "    balancer: round_robin\n    outlier_detection: off\n";
    let sluice = Sluice::start(&Sluice::cluster(&[dying.addr, good.addr], extra)).await;
    let mut client = sluice.client().await;
    for i in 0..10 {
        let reply = client.unary(request(&format!("{i}"))).await;
        let reply = reply.unwrap_or_else(|s| panic!("call {i} failed: {s:?}"));
        assert_eq!(reply.into_inner().backend_id, "good");
    }
    assert!(
        received.load(Ordering::SeqCst) >= 1,
        "the dying backend got no call"
    );
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_retries_total{cluster=\"echo\"}"),
        "{metrics}"
    );
}

/// A backend that took the call and died while working on it (200 ms later) may have acted:
/// that call is not run again elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_backend_held_before_dying_fails_with_unavailable() {
    let (dying, received) = dying_backend(Duration::from_millis(200)).await;
    let extra = "    outlier_detection: off\n";
    let sluice = Sluice::start(&Sluice::cluster(&[dying.addr], extra)).await;
    let mut client = sluice.client().await;
    let status = client.unary(request("held")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "it was not run a second time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_lost_connection_off_such_a_call_fails_with_unavailable() {
    let (dying, received) = dying_backend(Duration::ZERO).await;
    let extra = "    retry: { on_lost_connection: false }\n";
    let good = Echo::start("good").await;
    let extra = format!("    balancer: round_robin\n    outlier_detection: off\n{extra}");
    let sluice = Sluice::start(&Sluice::cluster(&[dying.addr, good.addr], &extra)).await;
    let mut client = sluice.client().await;
    let mut lost = 0;
    for i in 0..10 {
        if let Err(status) = client.unary(request(&format!("{i}"))).await {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("failed"), "{status:?}");
            lost += 1;
        }
    }
    assert_eq!(
        lost,
        received.load(Ordering::SeqCst),
        "every call it got was lost"
    );
    assert!(lost >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_between_calls_loses_no_call_in_twenty_rounds() {
    let failures = kill_between_calls(1, 100).await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_between_calls_loses_no_call_at_concurrency_8() {
    let failures = kill_between_calls(8, 13).await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
}

/// A backend that refuses every stream and a healthy one, round robin, with retries that the
/// budget always allows.
async fn refusing_then_healthy() -> (RefusingBackend, Echo, Sluice) {
    let refusing = RefusingBackend::start().await;
    let healthy = Echo::start("healthy").await;
    let config = Sluice::cluster(
        &[refusing.addr, healthy.addr],
        "    balancer: round_robin\n    retry: { max_attempts: 2, budget_ratio: 1.0 }\n",
    );
    let sluice = Sluice::start(&config).await;
    (refusing, healthy, sluice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_retried_on_another_backend_with_the_body_replayed() {
    let (refusing, _healthy, sluice) = refusing_then_healthy().await;
    let mut client = sluice.client().await;
    for i in 0..10 {
        let mut ask = request(&format!("call {i}"));
        ask.payload = vec![i as u8; 1000];
        let reply = client.unary(ask).await.unwrap().into_inner();
        assert_eq!(reply.backend_id, "healthy");
        assert_eq!(reply.message, format!("call {i}"));
        assert_eq!(
            reply.payload,
            vec![i as u8; 1000],
            "the replayed body changed"
        );
    }
    // Round robin sent about half of the first attempts to the refusing backend.
    assert!(refusing.refused.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retries_off_a_refused_stream_reaches_the_client_as_unavailable() {
    let refusing = RefusingBackend::start().await;
    let config = Sluice::cluster(&[refusing.addr], "    retry: { max_attempts: 1 }\n");
    let sluice = Sluice::start(&config).await;
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    // REFUSED_STREAM passes through as a reset; gRPC clients report it as UNAVAILABLE.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// The incident's third fact: a slow machine must be routed around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_a_slow_backend_well_under_its_share() {
    let fast1 = Echo::start("fast1").await;
    let fast2 = Echo::start("fast2").await;
    // 200 ms: well apart from the fast ones even when a loaded CI machine slows them.
    let slow = Echo::start_with_delay("slow", Duration::from_millis(200)).await;
    let sluice = Sluice::start(&Sluice::cluster(&[fast1.addr, fast2.addr, slow.addr], "")).await;
    let client = sluice.client().await;
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut slow_calls = 0;
            for i in 0..60 {
                let reply = client
                    .unary(request(&format!("{worker}-{i}")))
                    .await
                    .unwrap();
                if reply.into_inner().backend_id == "slow" {
                    slow_calls += 1;
                }
            }
            slow_calls
        }));
    }
    let mut slow_calls = 0;
    for task in tasks {
        slow_calls += task.await.unwrap();
    }
    // Round robin would give it 80 of 240.
    assert!(
        slow_calls < 24,
        "the slow backend served {slow_calls} of 240 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_that_processed_nothing_is_retried_on_another_backend() {
    let goaway = GoawayBackend::start().await;
    let healthy = Echo::start("healthy").await;
    let config = Sluice::cluster(
        &[goaway.addr, healthy.addr],
        "    balancer: round_robin\n    retry: { max_attempts: 2, budget_ratio: 1.0 }\n",
    );
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    for i in 0..10 {
        let reply = client
            .unary(request(&format!("call {i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.backend_id, "healthy");
        assert_eq!(reply.message, format!("call {i}"));
    }
    assert!(
        goaway.goaways.load(Ordering::Relaxed) >= 3,
        "the GOAWAY backend was not tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_backend_stopped_answering_is_closed_by_ping() {
    let backend = EchoProcess::start("b1").await;
    let extra = "    upstream_keepalive: { interval: 1s, timeout: 1s }\n";
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], extra)).await;
    sluice.client().await.unary(request("x")).await.unwrap();
    // A call stays open on the connection (PINGs go out only while one is); then the backend
    // stops. The kernel still ACKs for a stopped process; only a PING can tell.
    let mut client = sluice.client().await;
    let held = tokio::spawn(async move {
        let ask = support::EchoRequest {
            sleep_ms: 20_000,
            ..request("held")
        };
        client.unary(ask).await
    });
    let mut open = false;
    for _ in 0..500 {
        let view = sluice.backends_view().await;
        if view["clusters"][0]["backends"][0]["in_flight"] == 1 {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(open, "the held call never reached the backend");
    backend.signal("STOP");
    let closed = sluice.wait_no_connections(backend.addr).await;
    backend.signal("CONT");
    // The held call failed with the connection, instead of waiting out its 20 s.
    let status = held.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(closed, "the connection stayed open:\n{}", sluice.log());
    assert!(
        sluice.log().contains("did not answer a PING"),
        "{}",
        sluice.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_of_a_removed_backend_is_closed() {
    let staying = Echo::start("staying").await;
    let leaving = Echo::start("leaving").await;
    let extra = "    balancer: round_robin\n";
    let sluice = Sluice::start(&Sluice::cluster(&[staying.addr, leaving.addr], extra)).await;
    let mut client = sluice.client().await;
    for i in 0..4 {
        client.unary(request(&format!("{i}"))).await.unwrap();
    }
    assert!(support::established_with(leaving.addr.port()) > 0);
    sluice.rewrite_config(&Sluice::cluster(&[staying.addr], extra));
    sluice.signal("HUP");
    assert!(
        sluice
            .wait_backends("echo", &[staying.addr], Duration::from_secs(10))
            .await
    );
    // The idle timeout (5 min by default) plays no part here.
    let gone = support::wait_until(Duration::from_secs(10), || {
        support::established_with(leaving.addr.port()) == 0
    })
    .await;
    assert!(gone, "the removed backend's connection is still open");
    assert!(support::established_with(staying.addr.port()) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed() {
    let backend = Echo::start("b1").await;
    let extra = "    upstream_idle_timeout: 1s\n";
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], extra)).await;
    sluice.client().await.unary(request("x")).await.unwrap();
    assert!(support::established_with(backend.addr.port()) > 0);
    let closed = support::wait_until(Duration::from_secs(10), || {
        support::established_with(backend.addr.port()) == 0
    })
    .await;
    assert!(closed, "an idle connection stayed open");
    // The next call opens a new one.
    sluice.client().await.unary(request("y")).await.unwrap();
}

/// The total of `sluice_retries_total` for cluster `echo`.
fn retries_in(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("sluice_retries_total{cluster=\"echo\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_retries_an_answered_status_on_another_backend() {
    let broken = Echo::start_failing("broken", Code::Unavailable).await;
    let good = Echo::start("good").await;
    let extra = "    balancer: round_robin\n    outlier_detection: off\n    retry: { max_attempts: 2, budget_ratio: 1.0, retry_on: [unavailable] }\n";
    let sluice = Sluice::start(&Sluice::cluster(&[broken.addr, good.addr], extra)).await;
    let mut client = sluice.client().await;
    for i in 0..20 {
        let reply = client.unary(request(&format!("{i}"))).await;
        assert_eq!(reply.unwrap().into_inner().backend_id, "good");
    }
    assert!(broken.stats.calls.load(Ordering::Relaxed) >= 5);
    assert!(retries_in(&sluice.metrics().await) >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_passes_the_answer_on_when_no_retry_is_left_or_a_message_went_out() {
    let b1 = Echo::start("b1").await;
    let b2 = Echo::start("b2").await;
    let extra = "    retry: { max_attempts: 2, budget_ratio: 1.0, retry_on: [unavailable] }\n";
    let sluice = Sluice::start(&Sluice::cluster(&[b1.addr, b2.addr], extra)).await;
    let mut client = sluice.client().await;
    let calls = || b1.stats.calls.load(Ordering::Relaxed) + b2.stats.calls.load(Ordering::Relaxed);
    // Trailers-only UNAVAILABLE from both: retried once, then the answer as it came.
    let mut ask = request("fail");
    ask.fail_code = Code::Unavailable as i32;
    ask.fail_message = "said the backend".into();
    let status = client.unary(ask).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "said the backend");
    assert_eq!(calls(), 2);
    // A response message already went to the client: not retried.
    let mut ask = request("fail late");
    ask.fail_code = Code::Unavailable as i32;
    ask.fail_after_headers = true;
    let mut stream = client.server_stream(ask).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(
        stream.message().await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_stops_when_the_budget_is_spent() {
    let broken = Echo::start_failing("broken", Code::Unavailable).await;
    // budget_ratio 0: only the starting balance of 10 retries.
    let extra = "    outlier_detection: off\n    retry: { max_attempts: 2, budget_ratio: 0.0, retry_on: [unavailable] }\n";
    let sluice = Sluice::start(&Sluice::cluster(&[broken.addr], extra)).await;
    let mut client = sluice.client().await;
    for i in 0..30 {
        let status = client.unary(request(&format!("{i}"))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(retries_in(&sluice.metrics().await), 10);
    assert_eq!(broken.stats.calls.load(Ordering::Relaxed), 40);
}

/// A client stream whose messages arrive together, in separate DATA frames: sluice reads one
/// frame ahead (to put END_STREAM on the last), and a frame read ahead must be in the replay
/// when the first backend refuses the stream partway, or the retry would lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_stream_is_replayed_whole_when_its_frames_came_together() {
    use prost::Message;
    use support::raw_h2::*;
    use tokio::io::AsyncWriteExt;
    let (refusing, _healthy, sluice) = refusing_then_healthy().await;
    let mut tcp = raw(&sluice, &[]).await;
    let headers = [
        (":method", &b"POST"[..]),
        (":scheme", b"http"),
        (":path", b"/echo.v1.Echo/ClientStream"),
        (":authority", b"sluice"),
        ("content-type", b"application/grpc"),
        ("te", b"trailers"),
    ];
    let mut block = Vec::new();
    for (name, value) in headers {
        literal(name, value, &mut block);
    }
    for call in 0..20u32 {
        let stream = 2 * call + 1;
        let mut bytes = frame(HEADERS, END_HEADERS, stream, &block);
        // 40 messages of 1 KiB: the refusal comes while the upload is still going.
        for m in 0..40 {
            let flags = if m == 39 { END_STREAM } else { 0 };
            let mut message = request(&format!("m{m}"));
            message.payload = vec![b'p'; 1024];
            bytes.extend(frame(DATA, flags, stream, &support::grpc_frame(&message)));
        }
        tcp.write_all(&bytes).await.unwrap();
        // The answer's DATA: one gRPC message, an EchoResponse.
        let (got, payload) = read_until(&mut tcp, DATA, Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(got, stream);
        let reply = sluice::demo::pb::EchoResponse::decode(&payload[5..]).unwrap();
        assert_eq!(
            (reply.count, reply.message.as_str()),
            (40, "m39"),
            "call {call}"
        );
        // Read on to this stream's trailers so the next read starts clean.
        let _ = read_until(&mut tcp, HEADERS, Duration::from_secs(5)).await;
    }
    assert!(refusing.refused.load(Ordering::Relaxed) >= 3);
}
