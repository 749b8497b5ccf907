//! Steering: routes that match metadata, weighted and sticky splits, runtime drains and
//! weights through the admin endpoint and `sluice ctl`, who may make them, and rate limits.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{request, sluice_command, wait_until, Echo, EchoRequest, Sluice};
use tonic::metadata::MetadataValue;

/// Two single-backend clusters, `stable` and `canary`, then `routes`.
fn two_clusters(stable: &Echo, canary: &Echo, routes: &str) -> String {
    format!(
        "clusters:\n  - name: stable\n    discovery:\n      static: [\"{}\"]\n  - name: canary\n    discovery:\n      static: [\"{}\"]\nroutes:\n{routes}",
        stable.addr, canary.addr
    )
}

/// A unary call with these metadata.
fn with_metadata(message: &str, metadata: &[(&'static str, &str)]) -> tonic::Request<EchoRequest> {
    let mut call = tonic::Request::new(request(message));
    for (key, value) in metadata {
        let value: MetadataValue<_> = value.parse().expect("metadata value");
        call.metadata_mut().insert(*key, value);
    }
    call
}

#[tokio::test]
async fn header_matches_send_the_canary_tenant_to_the_canary_and_no_one_else() {
    let (stable, canary) = (Echo::start("stable").await, Echo::start("canary").await);
    let routes = "  - match: { headers: [{ name: x-tenant, exact: canary }] }\n    cluster: canary\n  - match: { service: echo.v1.Echo, headers: [{ name: x-region, prefix: eu- }, { name: x-debug, present: false }] }\n    cluster: canary\n  - cluster: stable\n";
    let sluice = Sluice::start(&two_clusters(&stable, &canary, routes)).await;
    let mut client = sluice.client().await;
    for _ in 0..20 {
        let reply = client
            .unary(with_metadata("t", &[("x-tenant", "canary")]))
            .await
            .expect("canary tenant");
        assert_eq!(reply.into_inner().backend_id, "canary");
    }
    for tenant in ["stable", "canaryx", ""] {
        let reply = client
            .unary(with_metadata("t", &[("x-tenant", tenant)]))
            .await
            .expect("other tenant");
        assert_eq!(reply.into_inner().backend_id, "stable", "tenant {tenant:?}");
    }
    let eu = client
        .unary(with_metadata("t", &[("x-region", "eu-west")]))
        .await
        .expect("eu");
    assert_eq!(eu.into_inner().backend_id, "canary");
    // `present: false`: a call carrying x-debug does not match the second route.
    let debug = client
        .unary(with_metadata(
            "t",
            &[("x-region", "eu-west"), ("x-debug", "1")],
        ))
        .await
        .expect("eu with debug");
    assert_eq!(debug.into_inner().backend_id, "stable");
    assert_eq!(canary.calls(), 21);
}

#[tokio::test]
async fn a_95_5_split_over_100000_calls_lands_within_half_a_point() {
    let (stable, canary) = (Echo::start("stable").await, Echo::start("canary").await);
    let routes = "  - name: echo\n    split: [{ cluster: stable, weight: 95 }, { cluster: canary, weight: 5 }]\n";
    let sluice = Sluice::start(&two_clusters(&stable, &canary, routes)).await;
    const CALLS: u64 = 100_000;
    const CALLERS: u64 = 32;
    let failed = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let mut client = sluice.client().await;
        let failed = Arc::clone(&failed);
        callers.push(tokio::spawn(async move {
            for _ in 0..CALLS / CALLERS {
                if client.unary(request("s")).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for caller in callers {
        caller.await.expect("caller");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let (to_stable, to_canary) = (stable.calls(), canary.calls());
    assert_eq!(to_stable + to_canary, CALLS);
    let share = to_canary as f64 / CALLS as f64 * 100.0;
    assert!((4.5..=5.5).contains(&share), "canary share {share:.2}%");
}

#[tokio::test]
async fn hash_on_lands_each_key_on_one_cluster_on_three_separate_instances() {
    let (stable, canary) = (Echo::start("stable").await, Echo::start("canary").await);
    let routes = "  - name: echo\n    split: [{ cluster: stable, weight: 50 }, { cluster: canary, weight: 50 }]\n    hash_on: { header: x-user-id }\n    cluster_header: x-sluice-cluster\n";
    let config = two_clusters(&stable, &canary, routes);
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Sluice::start(&config).await);
    }
    let mut clients = Vec::new();
    for sluice in &instances {
        clients.push(sluice.client().await);
    }
    let mut per_cluster = [0usize; 2];
    for user in 0..100 {
        let user = format!("user-{user}");
        let mut seen = std::collections::HashSet::new();
        for client in clients.iter_mut() {
            for _ in 0..2 {
                let reply = client
                    .unary(with_metadata("h", &[("x-user-id", &user)]))
                    .await
                    .expect("call");
                let header = reply.metadata().get("x-sluice-cluster").cloned();
                let cluster = header
                    .expect("cluster header")
                    .to_str()
                    .unwrap()
                    .to_string();
                assert_eq!(cluster, reply.into_inner().backend_id);
                seen.insert(cluster);
            }
        }
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        per_cluster[usize::from(seen.contains("canary"))] += 1;
    }
    // Sticky, and still a split: both clusters hold a fair part of the keys.
    assert!(per_cluster.iter().all(|n| *n >= 25), "{per_cluster:?}");
}

/// Three slow backends behind round robin, and the admin address `sluice ctl` needs.
async fn three_slow_backends() -> ([Echo; 3], Sluice) {
    let delay = Duration::from_millis(20);
    let backends = [
        Echo::start_with_delay("b1", delay).await,
        Echo::start_with_delay("b2", delay).await,
        Echo::start_with_delay("b3", delay).await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(&Sluice::cluster(&addrs, "    balancer: round_robin\n")).await;
    (backends, sluice)
}

fn ctl(sluice: &Sluice, action: &[&str]) -> (bool, String) {
    let admin = sluice.admin.to_string();
    let mut args = vec!["ctl", "--admin", admin.as_str()];
    args.extend_from_slice(action);
    sluice_command(&args)
}

/// The state `/backends` gives `address` in cluster `echo`.
async fn state_of(sluice: &Sluice, address: SocketAddr) -> String {
    let view = sluice.backends_view().await;
    let backends = view["clusters"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    (backends.iter())
        .find(|b| b["address"] == address.to_string())
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn ctl_drain_stops_new_calls_lets_the_one_in_flight_finish_and_undrain_brings_it_back() {
    let ([b1, b2, b3], sluice) = three_slow_backends().await;
    let mut client = sluice.client().await;
    // A long call on every backend (round robin: one each), in flight through the drain.
    let mut long_calls = Vec::new();
    for _ in 0..3 {
        let mut client = client.clone();
        let long = EchoRequest {
            sleep_ms: 1500,
            ..request("long")
        };
        long_calls.push(tokio::spawn(async move { client.unary(long).await }));
    }
    assert!(wait_until(Duration::from_secs(5), || b1.calls() == 1).await);
    let (ok, out) = ctl(&sluice, &["drain", "echo", &b1.addr.to_string()]);
    assert!(ok, "{out}");
    assert!(out.contains("applied"), "{out}");
    let drained_at = b1.calls();
    assert_eq!(state_of(&sluice, b1.addr).await, "drained");
    let metrics = sluice.metrics().await;
    let up = format!(
        "sluice_backend_up{{backend=\"{}\",cluster=\"echo\"}} 0",
        b1.addr
    );
    assert!(metrics.contains(&up), "{up} not in\n{metrics}");
    // New calls: none to b1 from the moment the command returned, and none fails.
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut sent = 0;
    while Instant::now() < deadline {
        client
            .unary(request("after"))
            .await
            .expect("a call after the drain");
        sent += 1;
    }
    assert!(sent > 10, "{sent}");
    assert_eq!(b1.calls(), drained_at, "b1 took a call after the drain");
    assert!(b2.calls() + b3.calls() >= sent);
    // The long call on b1 finishes OK.
    for call in long_calls {
        let reply = call
            .await
            .expect("task")
            .expect("a call in flight finishes OK");
        assert_eq!(reply.into_inner().message, "long");
    }
    let (ok, overrides) = ctl(&sluice, &["overrides"]);
    assert!(ok && overrides.contains("\"drained\": true"), "{overrides}");
    // Undrain: b1 takes calls again.
    let (ok, out) = ctl(&sluice, &["undrain", "echo", &b1.addr.to_string()]);
    assert!(ok, "{out}");
    for _ in 0..30 {
        client.unary(request("back")).await.expect("after undrain");
    }
    assert!(b1.calls() > drained_at);
    assert_eq!(state_of(&sluice, b1.addr).await, "healthy");
    let log = sluice.log();
    assert!(log.contains("backend drained by the operator"), "{log}");
    assert!(
        log.contains("override applied") && log.contains("by="),
        "{log}"
    );
}

#[tokio::test]
async fn overrides_survive_a_reload_and_one_naming_a_removed_cluster_is_reported() {
    let ([b1, b2, _b3], sluice) = three_slow_backends().await;
    let (ok, out) = ctl(&sluice, &["weight", "echo", &b2.addr.to_string(), "5"]);
    assert!(ok, "{out}");
    let (ok, out) = ctl(&sluice, &["drain", "echo", &b1.addr.to_string()]);
    assert!(ok, "{out}");
    // A bad change is refused with its reason.
    let (ok, out) = ctl(&sluice, &["drain", "nosuch", "1.2.3.4:5"]);
    assert!(
        !ok && out.contains("no cluster is named \"nosuch\""),
        "{out}"
    );
    let (ok, out) = ctl(&sluice, &["weight", "echo", "1.2.3.4:5", "0"]);
    assert!(!ok && out.contains("1 to 100"), "{out}");
    // SIGHUP with the same file: the drain and the weight stay.
    sluice.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || sluice
            .log()
            .contains("config reloaded"))
        .await
    );
    assert_eq!(state_of(&sluice, b1.addr).await, "drained");
    let view = sluice.backends_view().await;
    let weight = (view["clusters"][0]["backends"].as_array().unwrap().iter())
        .find(|b| b["address"] == b2.addr.to_string())
        .map(|b| b["weight"].clone());
    assert_eq!(weight, Some(serde_json::json!(5)));
    // A reload that renames the cluster: the overrides name a cluster no longer there.
    let addrs = [b1.addr, b2.addr];
    let renamed = Sluice::cluster(&addrs, "").replace("name: echo", "name: other");
    sluice.rewrite_config(&renamed);
    sluice.signal("HUP");
    let reported = wait_until(Duration::from_secs(10), || {
        sluice
            .log()
            .contains("an override names something the running config does not have")
    })
    .await;
    assert!(reported, "{}", sluice.log());
    assert!(sluice.metrics().await.contains("sluice_overrides_stale 1"));
}

#[tokio::test]
async fn ctl_split_moves_the_share_and_default_restores_the_config() {
    let (stable, canary) = (Echo::start("stable").await, Echo::start("canary").await);
    let routes = "  - name: echo\n    split: [{ cluster: stable, weight: 100 }, { cluster: canary, weight: 0 }]\n";
    let sluice = Sluice::start(&two_clusters(&stable, &canary, routes)).await;
    let mut client = sluice.client().await;
    for _ in 0..50 {
        client.unary(request("s")).await.expect("call");
    }
    assert_eq!(canary.calls(), 0);
    let (ok, out) = ctl(&sluice, &["split", "echo", "stable=0", "canary=1"]);
    assert!(ok, "{out}");
    for _ in 0..50 {
        client.unary(request("s")).await.expect("call");
    }
    assert_eq!(canary.calls(), 50);
    let (ok, out) = ctl(&sluice, &["split", "echo", "stable=1", "elsewhere=1"]);
    assert!(!ok && out.contains("not in route"), "{out}");
    let (ok, out) = ctl(&sluice, &["split", "echo", "default"]);
    assert!(ok, "{out}");
    for _ in 0..50 {
        client.unary(request("s")).await.expect("call");
    }
    assert_eq!(canary.calls(), 50);
}

#[tokio::test]
async fn a_split_gives_a_cluster_without_a_usable_backend_no_share() {
    let stable = Echo::start("stable").await;
    let canary = Echo::start("canary").await;
    let routes = "  - name: echo\n    split: [{ cluster: stable, weight: 50 }, { cluster: canary, weight: 50 }]\n";
    let sluice = Sluice::start(&two_clusters(&stable, &canary, routes)).await;
    let (ok, out) = ctl(&sluice, &["drain", "canary", &canary.addr.to_string()]);
    assert!(ok, "{out}");
    let mut client = sluice.client().await;
    for _ in 0..100 {
        client.unary(request("s")).await.expect("no call fails");
    }
    assert_eq!(canary.calls(), 0);
}

#[tokio::test]
async fn mutations_on_a_non_loopback_admin_need_the_token() {
    let echo = Echo::start("b1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token");
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let backend = echo.addr.to_string();
    // No token file: refused, 403, and logged.
    let open = Sluice::start_with_admin(any, "", &Sluice::cluster(&[echo.addr], "")).await;
    let (ok, out) = ctl(&open, &["drain", "echo", &backend]);
    assert!(!ok && out.contains("HTTP 403"), "{out}");
    assert!(open.log().contains("mutation refused"), "{}", open.log());
    assert_eq!(state_of(&open, echo.addr).await, "healthy");
    // A token file: no token or the wrong one is 401; the right one works.
    let admin_extra = format!("  token_file: \"{}\"\n", token_file.display());
    let guarded =
        Sluice::start_with_admin(any, &admin_extra, &Sluice::cluster(&[echo.addr], "")).await;
    let (ok, out) = ctl(&guarded, &["drain", "echo", &backend]);
    assert!(!ok && out.contains("HTTP 401"), "{out}");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess").expect("wrong token");
    let wrong = wrong.display().to_string();
    let (ok, out) = ctl(
        &guarded,
        &["--token-file", &wrong, "drain", "echo", &backend],
    );
    assert!(!ok && out.contains("HTTP 401"), "{out}");
    assert!(
        guarded.log().contains("wrong bearer token"),
        "{}",
        guarded.log()
    );
    assert_eq!(state_of(&guarded, echo.addr).await, "healthy");
    let right = token_file.display().to_string();
    let (ok, out) = ctl(
        &guarded,
        &["--token-file", &right, "drain", "echo", &backend],
    );
    assert!(ok, "{out}");
    assert_eq!(state_of(&guarded, echo.addr).await, "drained");
}
