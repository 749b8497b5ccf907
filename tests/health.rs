//! Active grpc.health.v1 checks: a backend whose health service says NOT_SERVING gets no new
//! calls until it says SERVING again; a backend without a health service stays in.

mod support;

use std::time::Duration;

use support::{request, Echo, Sluice};

const CHECKS: &str = "    health_check: { interval: 200ms, timeout: 2s, service: \"echo.v1.Echo\", unhealthy_threshold: 2, healthy_threshold: 1 }\n";

/// The `state` `/backends` shows for `address`, polled until it is `want` (at most 10 s).
async fn wait_state(sluice: &Sluice, address: std::net::SocketAddr, want: &str) -> bool {
    for _ in 0..500 {
        let view = sluice.backends_view().await;
        let found = view["clusters"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["address"] == address.to_string().as_str() && b["state"] == want);
        if found {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_not_serving_gets_no_calls_until_it_serves_again() {
    let good = Echo::start("good").await;
    let sick = Echo::start("sick").await;
    let sluice = Sluice::start(&Sluice::cluster(&[good.addr, sick.addr], CHECKS)).await;
    sick.set_serving(false).await;
    assert!(
        wait_state(&sluice, sick.addr, "unhealthy").await,
        "{}",
        sluice.log()
    );
    let mut client = sluice.client().await;
    for i in 0..30 {
        let reply = client.unary(request(&format!("{i}"))).await.unwrap();
        assert_eq!(reply.into_inner().backend_id, "good");
    }
    let metrics = sluice.metrics().await;
    let not_serving = format!(
        "sluice_health_checks_total{{backend=\"{}\",cluster=\"echo\",result=\"not_serving\"}}",
        sick.addr
    );
    assert!(metrics.contains(&not_serving), "{metrics}");
    assert!(
        sluice.log().contains("failed its health checks"),
        "{}",
        sluice.log()
    );
    sick.set_serving(true).await;
    assert!(
        wait_state(&sluice, sick.addr, "healthy").await,
        "{}",
        sluice.log()
    );
    let calls_to_sick = || sick.stats.calls.load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..200 {
        client.unary(request(&format!("again {i}"))).await.unwrap();
        if calls_to_sick() > 0 {
            break;
        }
    }
    assert!(
        calls_to_sick() > 0,
        "the recovered backend got none of 200 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_a_health_service_stays_healthy() {
    let plain = Echo::start_without_health("plain").await;
    let sluice = Sluice::start(&Sluice::cluster(&[plain.addr], CHECKS)).await;
    let logged = support::wait_until(Duration::from_secs(5), || {
        sluice.log().contains("has no grpc.health.v1 service")
    })
    .await;
    assert!(logged, "{}", sluice.log());
    assert!(wait_state(&sluice, plain.addr, "healthy").await);
    let reply = sluice.client().await.unary(request("x")).await.unwrap();
    assert_eq!(reply.into_inner().backend_id, "plain");
    let metrics = sluice.metrics().await;
    assert!(metrics.contains("result=\"unimplemented\""), "{metrics}");
}

/// The health checks' connections follow the cluster's connection settings, as the calls'
/// do: with `upstream_idle_timeout: 300ms` and a check every 2 s, each check's connection is
/// closed while it idles between checks (with transport defaults it stayed open 300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_connection_follows_the_clusters_connection_settings() {
    let backend = Echo::start("b1").await;
    let extra = "    health_check: { interval: 2s, timeout: 1s }\n    upstream_idle_timeout: 300ms\n    upstream_keepalive: { interval: 100ms, timeout: 1s }\n";
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], extra)).await;
    let checked = format!(
        "sluice_health_checks_total{{backend=\"{}\",cluster=\"echo\",result=\"serving\"}} 1",
        backend.addr
    );
    let mut first_check = false;
    for _ in 0..400 {
        if sluice.metrics().await.contains(&checked) {
            first_check = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        first_check,
        "no first health check within 4 s:\n{}",
        sluice.log()
    );
    // No call was made: the only connection to the backend is the check's.
    let port = backend.addr.port();
    let closed = support::wait_until(Duration::from_millis(1_500), || {
        support::established_with(port) == 0
    })
    .await;
    assert!(
        closed,
        "the check's connection outlived the cluster's idle timeout"
    );
}

/// A failed check says why: the log line that takes a backend out names the cause (here a
/// refused connect), not just "error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_taken_out_by_its_checks_is_logged_with_the_cause() {
    let good = Echo::start("good").await;
    let refused = support::RefusedAddrs::new(1);
    let gone = refused.addrs[0];
    let sluice = Sluice::start(&Sluice::cluster(&[good.addr, gone], CHECKS)).await;
    assert!(
        wait_state(&sluice, gone, "unhealthy").await,
        "{}",
        sluice.log()
    );
    let logged = support::wait_until(Duration::from_secs(5), || {
        sluice.log().lines().any(|l| {
            l.contains("backend unhealthy: failed its health checks")
                && l.contains("cause=\"connect failed:")
                && l.contains(&gone.to_string())
        })
    })
    .await;
    assert!(logged, "{}", sluice.log());
}
