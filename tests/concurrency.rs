//! Per-backend concurrency caps and the queue in front of them: a backend never holds more
//! than max_concurrent_streams_per_backend calls; calls wait in a FIFO queue bounded by
//! queue_timeout and max_queued, then get RESOURCE_EXHAUSTED, never an HTTP error.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{request, Echo, EchoRequest, Sluice};
use tonic::Code;

fn held(message: &str, ms: u32) -> EchoRequest {
    EchoRequest {
        sleep_ms: ms,
        ..request(message)
    }
}

/// Polls `/backends` (at most 500 times, 10 ms apart) until the cluster's queue holds `want`.
async fn queue_depth_is(sluice: &Sluice, want: u64) -> bool {
    for _ in 0..500 {
        if sluice.backends_view().await["clusters"][0]["queue_depth"] == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_never_hold_more_than_the_cap_and_the_rest_are_shed_in_time() {
    let backends = [
        Echo::start("b1").await,
        Echo::start("b2").await,
        Echo::start("b3").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let extra = "    max_concurrent_streams_per_backend: 4\n    queue_timeout: 100ms\n";
    let sluice = Sluice::start(&Sluice::cluster(&addrs, extra)).await;
    let client = sluice.client().await;
    let calls: Vec<_> = (0..48)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = client.unary(held(&format!("{i}"), 300)).await;
                (result.map(|_| ()).map_err(|s| s.code()), started.elapsed())
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            (Ok(()), _) => ok += 1,
            (Err(Code::ResourceExhausted), took) => {
                shed += 1;
                // queue_timeout is 100 ms; the rest is a loaded machine's scheduling.
                assert!(took < Duration::from_millis(1000), "shed after {took:?}");
            }
            (Err(code), _) => panic!("unexpected {code:?}"),
        }
    }
    for backend in &backends {
        assert!(backend.stats.peak_active.load(Ordering::Relaxed) <= 4);
    }
    // 12 slots of 300 ms: at least 12 served; calls that arrive late may get a slot freed
    // meanwhile, but most are shed.
    assert_eq!(ok + shed, 48);
    assert!(ok >= 12 && shed >= 24, "{ok} served, {shed} shed");
    let metrics = sluice.metrics().await;
    let overloaded =
        format!("sluice_rejected_total{{cluster=\"echo\",reason=\"overloaded\"}} {shed}");
    assert!(metrics.contains(&overloaded), "{metrics}");
    assert!(
        metrics.contains("sluice_queue_wait_seconds_count{cluster=\"echo\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_slot_goes_to_the_head_of_the_queue() {
    let backend = Echo::start("b1").await;
    let extra = "    max_concurrent_streams_per_backend: 1\n    queue_timeout: 10s\n";
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], extra)).await;
    let client = sluice.client().await;
    // Each call holds its slot 1 s: time enough to queue the next ones on a loaded machine.
    let spawn_call = |name: &'static str| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client.unary(held(name, 1000)).await.unwrap();
            Instant::now()
        })
    };
    let first = spawn_call("first");
    assert!(
        support::wait_until(Duration::from_secs(5), || {
            backend.stats.active.load(Ordering::Relaxed) == 1
        })
        .await
    );
    let second = spawn_call("second");
    assert!(
        queue_depth_is(&sluice, 1).await,
        "the second call never queued"
    );
    let third = spawn_call("third");
    assert!(
        queue_depth_is(&sluice, 2).await,
        "the third call never queued"
    );
    let (first, second, third) = (
        first.await.unwrap(),
        second.await.unwrap(),
        third.await.unwrap(),
    );
    assert!(first < second && second < third);
    assert_eq!(backend.stats.peak_active.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_at_once() {
    let backend = Echo::start("b1").await;
    let extra =
        "    max_concurrent_streams_per_backend: 1\n    queue_timeout: 5s\n    max_queued: 1\n";
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], extra)).await;
    let client = sluice.client().await;
    let mut holding = client.clone();
    let hold = tokio::spawn(async move { holding.unary(held("hold", 3000)).await });
    assert!(
        support::wait_until(Duration::from_secs(5), || {
            backend.stats.active.load(Ordering::Relaxed) == 1
        })
        .await
    );
    let mut waiting = client.clone();
    let wait = tokio::spawn(async move { waiting.unary(request("wait")).await });
    assert!(
        queue_depth_is(&sluice, 1).await,
        "the waiting call never queued"
    );
    let started = Instant::now();
    let status = client.clone().unary(request("shed")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("already wait"), "{status:?}");
    // Retrying clients are told when to come back (gRFC A6): 50 ms to 10 s, jittered ±25%.
    let pushback = status.metadata().get("grpc-retry-pushback-ms");
    let millis: u64 = pushback
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no grpc-retry-pushback-ms: {status:?}"));
    assert!((37..=12_500).contains(&millis), "pushback {millis} ms");
    assert!(started.elapsed() < Duration::from_millis(1000));
    hold.await.unwrap().unwrap();
    wait.await.unwrap().unwrap();
}
