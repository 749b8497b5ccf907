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
    eprintln!("canary share: {share:.2}% of {CALLS} calls");
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

/// Two rate-limited routes over one backend: `tenants` (40/s, burst 4, per client, the
/// default key room) and, for calls with `x-limit: small`, `small` (room for 50 keys).
async fn rate_limited() -> (Echo, Sluice) {
    let echo = Echo::start("b1").await;
    let rest = format!(
        "client_key: {{ header: x-tenant }}\n{}routes:\n  - name: small\n    match: {{ headers: [{{ name: x-limit, exact: small }}] }}\n    cluster: echo\n    rate_limit: {{ rate: 100/s, max_keys: 50 }}\n  - name: tenants\n    cluster: echo\n    rate_limit: {{ rate: 40/s, burst: 4, per: client }}\n",
        Sluice::cluster(&[echo.addr], "")
    );
    (echo, Sluice::start(&rest).await)
}

#[tokio::test]
async fn at_twice_its_limit_a_client_gets_its_rate_and_every_refusal_says_when_to_retry() {
    let (_echo, sluice) = rate_limited().await;
    let mut client = sluice.client().await;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / 80));
    let (mut accepted, mut refused) = (0u32, 0u32);
    let start = Instant::now();
    let mut last = start;
    while start.elapsed() < Duration::from_secs(5) {
        tick.tick().await;
        last = Instant::now();
        match client
            .unary(with_metadata("r", &[("x-tenant", "heavy")]))
            .await
        {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                let pushback = status.metadata().get("grpc-retry-pushback-ms");
                let ms: u64 = pushback
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or_else(|| panic!("no pushback on {status:?}"));
                assert!((1..=50).contains(&ms), "pushback {ms} ms");
                refused += 1;
            }
        }
    }
    // The bucket starts full (4), then gains 40 a second.
    let elapsed = last.duration_since(start).as_secs_f64();
    let rate = f64::from(accepted - 4) / elapsed;
    eprintln!(
        "accepted {rate:.2}/s against a 40/s limit ({accepted} of {} in {elapsed:.2}s)",
        accepted + refused
    );
    assert!(
        (38.0..=42.0).contains(&rate),
        "accepted {rate:.1}/s ({accepted} in {elapsed:.2}s)"
    );
    assert!(refused > 150, "{refused}");
    // Another client is not limited by the heavy one.
    client
        .unary(with_metadata("r", &[("x-tenant", "quiet")]))
        .await
        .expect("another client");
    let metrics = sluice.metrics().await;
    let counted =
        format!("sluice_rejected_total{{cluster=\"echo\",reason=\"rate_limited\"}} {refused}");
    assert!(metrics.contains(&counted), "{counted} not in\n{metrics}");
}

#[tokio::test]
async fn ten_thousand_clients_fit_the_default_key_room_and_a_small_room_evicts() {
    let (_echo, sluice) = rate_limited().await;
    let next = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let mut client = sluice.client().await;
        let next = Arc::clone(&next);
        callers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= 10_000 {
                    return;
                }
                let tenant = format!("tenant-{n}");
                let call = with_metadata("k", &[("x-tenant", &tenant)]);
                client
                    .unary(call)
                    .await
                    .expect("a client's first call is never limited");
            }
        }));
    }
    for caller in callers {
        caller.await.expect("caller");
    }
    let mut client = sluice.client().await;
    for n in 0..100 {
        let tenant = format!("small-{n}");
        let call = with_metadata("k", &[("x-tenant", &tenant), ("x-limit", "small")]);
        client.unary(call).await.expect("first call of a key");
    }
    let metrics = sluice.metrics().await;
    let none = "sluice_rate_limit_keys_evicted_total{route=\"tenants\"} 0";
    assert!(metrics.contains(none), "{none} not in\n{metrics}");
    let fifty = "sluice_rate_limit_keys_evicted_total{route=\"small\"} 50";
    assert!(metrics.contains(fifty), "{fifty} not in\n{metrics}");
}

/// `sluice ctl --etcd URL --prefix t/overrides --fleet-prefix t/fleet ACTION...`.
fn fleet_ctl(etcd: &support::etcd::Etcd, action: &[&str]) -> (bool, String) {
    let url = etcd.url();
    let mut args = vec!["ctl", "--etcd", url.as_str(), "--prefix", "t/overrides"];
    args.extend_from_slice(&["--fleet-prefix", "t/fleet"]);
    args.extend_from_slice(action);
    sluice_command(&args)
}

#[tokio::test]
async fn one_ctl_drain_through_etcd_reaches_three_instances_and_one_restarted() {
    let etcd = support::etcd::Etcd::start().await;
    let delay = Duration::from_millis(5);
    let [b1, b2, b3] = [
        Echo::start_with_delay("b1", delay).await,
        Echo::start_with_delay("b2", delay).await,
        Echo::start_with_delay("b3", delay).await,
    ];
    let rest = format!(
        "etcd:\n  endpoints: [\"{}\"]\n  dial_timeout: 1s\noverrides: {{ etcd_prefix: t/overrides }}\nfleet: {{ etcd_prefix: t/fleet }}\n{}",
        etcd.url(),
        Sluice::cluster(&[b1.addr, b2.addr, b3.addr], "    balancer: round_robin\n")
    );
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(Sluice::start(&rest).await);
    }
    let listed = wait_until(Duration::from_secs(10), || {
        fleet_ctl(&etcd, &["status"]).1.contains("3 instance(s)")
    })
    .await;
    assert!(listed, "{}", fleet_ctl(&etcd, &["status"]).1);
    let (ok, out) = fleet_ctl(&etcd, &["drain", "echo", &b1.addr.to_string()]);
    assert!(ok && out.contains("written for the fleet"), "{out}");
    let written = Instant::now();
    for sluice in &fleet {
        while state_of(sluice, b1.addr).await != "drained" {
            assert!(
                written.elapsed() < Duration::from_secs(2),
                "{}",
                sluice.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let before = b1.calls();
    for sluice in &fleet {
        let mut client = sluice.client().await;
        for _ in 0..30 {
            client.unary(request("f")).await.expect("call");
        }
    }
    assert_eq!(b1.calls(), before, "a drained backend took calls");
    assert!(
        fleet[0].log().contains("fleet override applied"),
        "{}",
        fleet[0].log()
    );
    // A restarted instance starts with the drain applied.
    let mut old = fleet.remove(0);
    old.signal("TERM");
    assert!(old.wait_exit(Duration::from_secs(10)).await.is_some());
    drop(old);
    let restarted = Sluice::start(&rest).await;
    assert_eq!(state_of(&restarted, b1.addr).await, "drained");
    let mut client = restarted.client().await;
    for _ in 0..30 {
        client.unary(request("f")).await.expect("call");
    }
    assert_eq!(b1.calls(), before);
    fleet.push(restarted);
    // Every instance at the same revision.
    let current = wait_until(Duration::from_secs(10), || {
        let (ok, out) = fleet_ctl(&etcd, &["status"]);
        ok && out.contains("3 instance(s)") && out.matches(" current").count() == 3
    })
    .await;
    assert!(current, "{}", fleet_ctl(&etcd, &["status"]).1);
    let (ok, out) = fleet_ctl(&etcd, &["overrides"]);
    assert!(ok && out.contains("\"drained\": true"), "{out}");
}

#[tokio::test]
async fn a_fleet_wide_limit_is_divided_by_the_live_instances() {
    let etcd = support::etcd::Etcd::start().await;
    let echo = Echo::start("b1").await;
    let rest = format!(
        "etcd:\n  endpoints: [\"{}\"]\n  dial_timeout: 1s\nfleet: {{ etcd_prefix: t/fleet }}\n{}routes:\n  - name: shared\n    cluster: echo\n    rate_limit: {{ rate: 40/s, burst: 20, per: route, fleet_wide: true }}\n",
        etcd.url(),
        Sluice::cluster(&[echo.addr], "")
    );
    let fleet = [Sluice::start(&rest).await, Sluice::start(&rest).await];
    // Both registered, and each has counted the other.
    let counted = wait_until(Duration::from_secs(10), || {
        fleet_ctl(&etcd, &["status"]).1.contains("2 instance(s)")
    })
    .await;
    assert!(counted, "{}", fleet_ctl(&etcd, &["status"]).1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Each instance, asked at 40/s, takes its half of the fleet's 40/s, after its half of
    // the burst (10).
    let mut client = fleet[0].client().await;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let (start, mut accepted, mut last) = (Instant::now(), 0u32, Instant::now());
    while start.elapsed() < Duration::from_secs(4) {
        tick.tick().await;
        last = Instant::now();
        if client.unary(request("f")).await.is_ok() {
            accepted += 1;
        }
    }
    let elapsed = last.duration_since(start).as_secs_f64();
    let rate = f64::from(accepted.saturating_sub(10)) / elapsed;
    eprintln!("one of two instances accepted {rate:.2}/s of a fleet-wide 40/s");
    assert!(
        (18.0..=22.0).contains(&rate),
        "{rate:.2}/s ({accepted} in {elapsed:.2}s)"
    );
}
