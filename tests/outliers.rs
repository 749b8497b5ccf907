//! Passive outlier detection and panic mode: a backend that fails call after call is ejected
//! (never more than max_ejection_percent of a cluster), and a cluster with no usable backend
//! tries them all and says so.

mod support;

use support::{request, Echo, RefusedAddrs, Sluice};
use tonic::Code;

/// The `/backends` entry of `address` in the first cluster.
async fn backend_view(sluice: &Sluice, address: std::net::SocketAddr) -> serde_json::Value {
    let view = sluice.backends_view().await;
    view["clusters"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == address.to_string().as_str())
        .cloned()
        .unwrap_or_default()
}

/// Sends `calls` sequential calls; returns how many failed.
async fn failures_of(sluice: &Sluice, calls: u32) -> u32 {
    let mut client = sluice.client().await;
    let mut failed = 0;
    for i in 0..calls {
        failed += u32::from(client.unary(request(&format!("{i}"))).await.is_err());
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_every_call_is_ejected() {
    let good1 = Echo::start("good1").await;
    let good2 = Echo::start("good2").await;
    let broken = Echo::start_failing("broken", Code::Unavailable).await;
    // Round robin, so the broken backend keeps getting its turn until it is ejected.
    let extra = "    balancer: round_robin\n";
    let config = Sluice::cluster(&[good1.addr, good2.addr, broken.addr], extra);
    let sluice = Sluice::start(&config).await;
    // Default: 5 failures in a row eject it.
    assert_eq!(failures_of(&sluice, 60).await, 5);
    let view = backend_view(&sluice, broken.addr).await;
    assert_eq!(view["state"], "ejected", "{view}");
    let left = view["ejected_for_ms"].as_u64().unwrap_or_default();
    assert!(left > 0 && left <= 10_000, "{view}");
    let metrics = sluice.metrics().await;
    let ejections = format!(
        "sluice_outlier_ejections_total{{backend=\"{}\",cluster=\"echo\"}} 1",
        broken.addr
    );
    assert!(metrics.contains(&ejections), "{metrics}");
    let down = format!(
        "sluice_backend_up{{backend=\"{}\",cluster=\"echo\"}} 0",
        broken.addr
    );
    assert!(metrics.contains(&down), "{metrics}");
    assert!(sluice.log().contains("backend ejected"), "{}", sluice.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_ejection_percent_is_ejected() {
    let good = Echo::start("good").await;
    let broken1 = Echo::start_failing("broken1", Code::Internal).await;
    let broken2 = Echo::start_failing("broken2", Code::Internal).await;
    let extra = "    balancer: round_robin\n    outlier_detection: { consecutive_failures: 2, max_ejection_percent: 50 }\n";
    let config = Sluice::cluster(&[good.addr, broken1.addr, broken2.addr], extra);
    let sluice = Sluice::start(&config).await;
    failures_of(&sluice, 30).await;
    let states = [
        backend_view(&sluice, broken1.addr).await["state"].clone(),
        backend_view(&sluice, broken2.addr).await["state"].clone(),
    ];
    // Two of three would be 67% of the cluster: only one goes.
    let ejected = states.iter().filter(|s| **s == "ejected").count();
    assert_eq!(ejected, 1, "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_off_ejects_nothing() {
    let good = Echo::start("good").await;
    let broken = Echo::start_failing("broken", Code::Unavailable).await;
    let extra = "    balancer: round_robin\n    outlier_detection: off\n";
    let sluice = Sluice::start(&Sluice::cluster(&[good.addr, broken.addr], extra)).await;
    assert_eq!(failures_of(&sluice, 20).await, 10);
    assert_eq!(backend_view(&sluice, broken.addr).await["state"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_usable_backend_the_cluster_tries_them_all_and_says_so() {
    let dead = RefusedAddrs::new(2);
    let extra = "    connect_timeout: 200ms\n";
    let sluice = Sluice::start(&Sluice::cluster(&dead.addrs, extra)).await;
    let mut client = sluice.client().await;
    // Both connects fail, so both backends back off; calls still try one. Calls go on until
    // one finds both in backoff (bounded: 100 calls).
    let mut in_panic = false;
    for _ in 0..100 {
        let status = client.unary(request("x")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        if sluice.log().contains("panic mode: no backend is usable") {
            in_panic = true;
            break;
        }
    }
    assert!(in_panic, "{}", sluice.log());
    let view = sluice.backends_view().await;
    assert_eq!(view["clusters"][0]["panic_mode"], true, "{view}");
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_panic_mode{cluster=\"echo\"} 1"),
        "{metrics}"
    );
}
