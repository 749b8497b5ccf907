//! Overload of the whole service (the incident's third fact, for every backend at once):
//! adaptive concurrency limits keep the work at each backend small, calls that cannot meet
//! their deadline are never sent, the client sending the most is shed first, and a fast
//! healthy cluster never notices any of it. The full-size runs, against HAProxy and NGINX, are
//! in loadtest/RESULTS.md ("Overload of the whole service"); these are shorter, with bounds
//! loose enough for a shared machine.

mod support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::demo::pb::echo_client::EchoClient;
use support::{request, Echo, EchoRequest, Sluice};
use tonic::Code;

const WORK: Duration = Duration::from_millis(25);

/// Three backends of two workers, 25 ms a call (240 calls/s in all), whose queued work is
/// done even after its caller has gone, behind a sluice with `extra` cluster keys.
async fn busy_cluster(extra: &str) -> ([Echo; 3], Sluice) {
    let backends = [
        Echo::start_with_workers("b1", 2, WORK, false).await,
        Echo::start_with_workers("b2", 2, WORK, false).await,
        Echo::start_with_workers("b3", 2, WORK, false).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(&Sluice::cluster(&addrs, extra)).await;
    (backends, sluice)
}

/// What an open-loop run saw: per call, when it was meant to start (since the run began) and
/// its code.
type Outcomes = Vec<(Duration, Code)>;

/// Sends calls with a 1 s deadline at `rate` a second for `length`, open loop (a call is sent
/// at its time whether or not the earlier ones are answered), on `client`'s connection.
async fn offer(
    client: &EchoClient<tonic::transport::Channel>,
    rate: f64,
    length: Duration,
) -> Outcomes {
    let started = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut calls = Vec::new();
    let mut at = Duration::ZERO;
    while at < length {
        tokio::time::sleep_until((started + at).into()).await;
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let mut call = tonic::Request::new(request("overload"));
            call.set_timeout(Duration::from_secs(1));
            let code = match client.unary(call).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            (at, code)
        }));
        at += period;
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.expect("call task"));
    }
    outcomes
}

/// Calls answered OK among those meant to start in `[from, to)`, and how many there were.
fn ok_between(outcomes: &Outcomes, from: Duration, to: Duration) -> (usize, usize) {
    let sent: Vec<_> = (outcomes.iter())
        .filter(|(at, _)| *at >= from && *at < to)
        .collect();
    let ok = sent.iter().filter(|(_, code)| *code == Code::Ok).count();
    (ok, sent.len())
}

/// Each backend's `concurrency_limit` in `/backends`, from the admin endpoint at `admin`.
async fn limits_at(admin: std::net::SocketAddr) -> Vec<u64> {
    let (_, body) = support::http_get(admin, "/backends")
        .await
        .expect("/backends");
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    (view["clusters"][0]["backends"]
        .as_array()
        .expect("backends"))
    .iter()
    .map(|b| b["concurrency_limit"].as_u64().expect("concurrency_limit"))
    .collect()
}

/// Work started after the caller's deadline, as a share of all work started.
fn wasted(backends: &[Echo]) -> f64 {
    let (started, late) = (backends.iter())
        .map(Echo::work)
        .fold((0, 0), |(s, l), (started, late)| (s + started, l + late));
    late as f64 / started.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_capacity_keeps_the_backends_on_calls_that_can_still_be_answered() {
    let (backends, sluice) = busy_cluster("").await;
    let client = sluice.client().await;
    // The limits while the overload lasts (once it ends, they climb back).
    let admin = sluice.admin;
    let during = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        limits_at(admin).await
    });
    let outcomes = offer(&client, 480.0, Duration::from_secs(4)).await;
    // Goodput once the limits have settled: 240 calls/s is all the backends can do.
    let (ok, _) = ok_between(
        &outcomes,
        Duration::from_millis(1500),
        Duration::from_secs(4),
    );
    let goodput = ok as f64 / 2.5 / 240.0;
    let waste = wasted(&backends);
    let limits = during.await.expect("limits task");
    eprintln!(
        "goodput {:.0}% of capacity, {:.1}% wasted, limits {limits:?}",
        goodput * 100.0,
        waste * 100.0
    );
    assert!(
        goodput >= 0.6,
        "goodput {goodput:.2} of capacity; limits {limits:?}"
    );
    assert!(
        waste <= 0.05,
        "{:.1}% of the work was for callers already gone",
        waste * 100.0
    );
    // Two workers each: the limits came down from their start of 20.
    assert!(limits.iter().all(|l| *l < 20), "limits {limits:?}");
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_concurrency_limit{backend=\""),
        "{metrics}"
    );
    let shed = (metrics.lines())
        .find_map(|l| {
            l.strip_prefix("sluice_rejected_total{cluster=\"echo\",reason=\"overloaded\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok());
    assert!(shed.is_some_and(|n| n > 0), "shed {shed:?}: {metrics}");
    // The operator hears of it.
    let log = sluice.log();
    assert!(log.contains("cluster overloaded"), "{log}");
    assert!(log.contains("concurrency limit fell"), "{log}");
    // Offered half the capacity, nearly every call gets through again.
    let relief = offer(&client, 120.0, Duration::from_secs(2)).await;
    let (ok, sent) = ok_between(&relief, Duration::ZERO, Duration::from_secs(2));
    assert!(ok * 100 >= sent * 95, "{ok} of {sent} OK at half capacity");
    // And the limits have climbed back towards their start.
    let view = sluice.backends_view().await;
    for backend in view["clusters"][0]["backends"]
        .as_array()
        .expect("backends")
    {
        assert!(
            backend["concurrency_limit"].as_u64() >= Some(10),
            "{backend}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_adaptive_limits_the_same_overload_is_mostly_work_for_callers_already_gone() {
    // The scenario above, with a fixed cap as before: what the limits prevent.
    let (backends, sluice) = busy_cluster("    adaptive_concurrency: off\n").await;
    let client = sluice.client().await;
    let outcomes = offer(&client, 480.0, Duration::from_secs(4)).await;
    let (ok, _) = ok_between(
        &outcomes,
        Duration::from_millis(1500),
        Duration::from_secs(4),
    );
    let waste = wasted(&backends);
    eprintln!("adaptive off: {ok} OK, {:.1}% wasted", waste * 100.0);
    assert!(waste > 0.2, "{:.1}% wasted", waste * 100.0);
    assert!(ok as f64 / 2.5 < 0.5 * 240.0, "{ok} OK");
    let view = sluice.backends_view().await;
    let limit = &view["clusters"][0]["backends"][0]["concurrency_limit"];
    assert_eq!(limit, 1000, "off: the cap is the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_cluster_never_notices_the_limits() {
    let backends = [
        Echo::start("b1").await,
        Echo::start("b2").await,
        Echo::start("b3").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    // A loaded test machine may stall a backend for a moment; a call queued then must not be
    // shed for it.
    let sluice = Sluice::start(&Sluice::cluster(&addrs, "    queue_timeout: 5s\n")).await;
    let client = sluice.client().await;
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (mut client, next) = (client.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                let mut failed = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < 2000 {
                    if let Err(status) = client.unary(request("fast")).await {
                        failed.push(status);
                    }
                }
                failed
            })
        })
        .collect();
    for worker in workers {
        let failed = worker.await.expect("worker");
        assert!(failed.is_empty(), "{failed:?}");
    }
    // None was turned away, and hardly any waited for a slot (a loaded test machine can
    // stall a backend for a moment).
    let metrics = sluice.metrics().await;
    for want in [
        "sluice_rejected_total{cluster=\"echo\",reason=\"overloaded\"} 0",
        "sluice_rejected_total{cluster=\"echo\",reason=\"unmeetable_deadline\"} 0",
    ] {
        assert!(metrics.contains(want), "want {want}:\n{metrics}");
    }
    let queued = (metrics.lines())
        .find_map(|l| l.strip_prefix("sluice_queue_wait_seconds_count{cluster=\"echo\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    let limits = limits_at(sluice.admin).await;
    eprintln!("{queued:?} of 2000 calls queued; limits after the burst {limits:?}");
    assert!(
        queued.is_some_and(|n| n <= 20),
        "{queued:?} calls queued; limits {limits:?}"
    );
}

/// Calls of a method that usually takes 200 ms, then one with 100 ms left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_meet_its_deadline_is_never_sent() {
    let backend = Echo::start_with_delay("b1", Duration::from_millis(200)).await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    for _ in 0..3 {
        client.unary(request("usual")).await.expect("usual call");
    }
    let seen = backend.calls();
    let mut call = tonic::Request::new(request("hurried"));
    call.set_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let status = client.unary(call).await.expect_err("refused");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("not sent"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(90),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.calls(), seen, "the backend saw the call");
    let metrics = sluice.metrics().await;
    let want = "sluice_rejected_total{cluster=\"echo\",reason=\"unmeetable_deadline\"} 1";
    assert!(metrics.contains(want), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_leaves_the_queue_when_its_deadline_can_no_longer_be_met() {
    let backend = Echo::start_with_delay("b1", Duration::from_millis(300)).await;
    let extra = "    max_concurrent_streams_per_backend: 1\n    queue_timeout: 10s\n";
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], extra)).await;
    let mut client = sluice.client().await;
    for _ in 0..2 {
        client.unary(request("usual")).await.expect("usual call");
    }
    // Holds the only slot for 1.3 s.
    let mut holder = client.clone();
    let hold = tokio::spawn(async move {
        let held = EchoRequest {
            sleep_ms: 1000,
            ..request("hold")
        };
        holder.unary(held).await
    });
    assert!(
        support::wait_until(Duration::from_secs(5), || backend.calls() == 3).await,
        "the holding call never reached the backend"
    );
    // 800 ms left, and the method takes 300: it can wait 500 ms at most.
    let mut call = tonic::Request::new(request("waits"));
    call.set_timeout(Duration::from_millis(800));
    let started = Instant::now();
    let status = client.unary(call).await.expect_err("shed");
    let waited = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("cannot be met"), "{status:?}");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_millis(780),
        "left after {waited:?}"
    );
    hold.await.expect("hold task").expect("hold call");
    assert_eq!(backend.calls(), 3, "the waiting call reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sending_the_most_is_shed_first() {
    // 2 workers of 50 ms: 40 calls/s. One client sends 200/s, the other 10/s; each is a
    // client of its own by its IP (client_key: peer_ip, the default).
    let backend = Echo::start_with_workers("b1", 2, Duration::from_millis(50), false).await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let heavy = sluice.client().await;
    let light_ip: IpAddr = "127.0.0.2".parse().expect("loopback");
    let light = sluice.client_from(light_ip).await;
    let length = Duration::from_secs(3);
    let (heavy_outcomes, light_outcomes) =
        tokio::join!(offer(&heavy, 200.0, length), offer(&light, 10.0, length));
    // From the first second on: at first, the backend's queue takes its initial limit's worth
    // of the heavy client's calls, which the light ones wait behind like everyone.
    let (light_ok, light_sent) = ok_between(&light_outcomes, Duration::from_secs(1), length);
    let (heavy_ok, heavy_sent) = ok_between(&heavy_outcomes, Duration::ZERO, length);
    eprintln!("light {light_ok} of {light_sent} OK, heavy {heavy_ok} of {heavy_sent}");
    let failed: Vec<_> = light_outcomes
        .iter()
        .filter(|(at, c)| *c != Code::Ok && *at >= Duration::from_secs(1))
        .collect();
    assert!(
        light_ok * 100 >= light_sent * 95,
        "light client: {light_ok} of {light_sent} OK (heavy: {heavy_ok} of {heavy_sent}); failed: {failed:?}"
    );
    assert!(
        heavy_ok * 2 < heavy_sent,
        "heavy: {heavy_ok} of {heavy_sent} OK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_hold_long_before_answering_grow_the_limit_past_its_start() {
    // Long polls: each call holds 1 s before it answers. 60 at once on one backend, twice:
    // three times the initial limit, and none waits or is shed.
    let backend = Echo::start_with_delay("b1", Duration::from_secs(1)).await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let client = sluice.client().await;
    for wave in 0..2 {
        let calls: Vec<_> = (0..60)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move { client.unary(request("poll")).await.map(|_| ()) })
            })
            .collect();
        for call in calls {
            let result = call.await.expect("call task");
            assert!(result.is_ok(), "wave {wave}: {result:?}");
        }
    }
    let view = sluice.backends_view().await;
    let limit = view["clusters"][0]["backends"][0]["concurrency_limit"].as_u64();
    assert!(limit >= Some(60), "limit {limit:?}");
}
