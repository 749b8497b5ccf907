//! Process lifecycle: SIGTERM drains, SIGHUP reloads, SIGQUIT hands the listening sockets to a
//! new process. None of them may fail a call in flight.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{request, Echo, Sluice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    drain_on_sigterm(2).await;
}

/// With one thread each listener runs a single-thread scheduler, which shuts down its own way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_thread_sluice_drains_on_sigterm_too() {
    drain_on_sigterm(1).await;
}

async fn drain_on_sigterm(threads: usize) {
    let backend = Echo::start("b1").await;
    let mut sluice =
        Sluice::start_with_threads(threads, &Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    let mut ask = request("long");
    ask.sleep_ms = 800;
    let call = tokio::spawn(async move { client.unary(ask).await });
    let stats = &backend.stats;
    assert!(
        support::wait_until(Duration::from_secs(5), || stats
            .calls
            .load(Ordering::Relaxed)
            == 1)
        .await
    );
    let signalled = Instant::now();
    sluice.signal("TERM");
    // While draining, readiness fails so a load balancer stops sending new connections.
    // (Polled: the signal is handled asynchronously.)
    let mut readiness = None;
    for _ in 0..100 {
        let (status, body) = support::http_get(sluice.admin, "/readyz").await.unwrap();
        if status == 503 {
            readiness = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(readiness.as_deref().map(str::trim), Some("draining"));

    let reply = call
        .await
        .unwrap()
        .expect("the in-flight call completes during the drain");
    assert_eq!(reply.into_inner().message, "long");
    let exit = sluice
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("sluice exits");
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_clusters_and_keeps_calls_in_flight() {
    let old = Echo::start("old").await;
    let new = Echo::start("new").await;
    let sluice = Sluice::start(&Sluice::cluster(&[old.addr], "")).await;
    let mut client = sluice.client().await;
    let mut long = request("spans the reload");
    long.sleep_ms = 600;
    let mut in_flight_client = client.clone();
    let in_flight = tokio::spawn(async move { in_flight_client.unary(long).await });
    let stats = &old.stats;
    assert!(
        support::wait_until(Duration::from_secs(5), || stats
            .calls
            .load(Ordering::Relaxed)
            == 1)
        .await
    );

    sluice.rewrite_config(&Sluice::cluster(&[new.addr], ""));
    sluice.signal("HUP");
    let mut served_by_new = false;
    for _ in 0..250 {
        let reply = client.unary(request("after")).await.unwrap().into_inner();
        if reply.backend_id == "new" {
            served_by_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served_by_new,
        "the reloaded cluster never took traffic:\n{}",
        sluice.log()
    );
    let reply = in_flight
        .await
        .unwrap()
        .expect("the call in flight survives the reload");
    assert_eq!(reply.into_inner().backend_id, "old");

    // An invalid file is rejected and the running config stays.
    std::fs::write(&sluice.config_path, "listeners: [").unwrap();
    sluice.signal("HUP");
    let rejected = support::wait_until(Duration::from_secs(5), || {
        sluice.log().contains("SIGHUP: config rejected")
    })
    .await;
    assert!(rejected, "{}", sluice.log());
    for _ in 0..10 {
        let reply = client.unary(request("still")).await.unwrap().into_inner();
        assert_eq!(reply.backend_id, "new");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_hands_the_listeners_to_an_upgraded_process_without_failing_calls() {
    upgrade_on_sigquit(2, Duration::ZERO).await;
}

/// As the docs have it: start the new process, then send SIGQUIT, a person's pause later
/// (long enough for pingora's once-a-second ERROR to have shown, short of the WARN at 3.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_thread_sluice_hands_its_listeners_over_too() {
    upgrade_on_sigquit(1, Duration::from_millis(1_500)).await;
}

async fn upgrade_on_sigquit(threads: usize, pause: Duration) {
    let backend = Echo::start("b1").await;
    let mut old = Sluice::start_with_threads(threads, &Sluice::cluster(&[backend.addr], "")).await;
    let mut old_client = old.client().await;
    let mut long = request("started before the upgrade");
    // Past the old process's 5 s of accepting beside the new one, with 3 s to spare for the
    // new process's start: it is the last to finish.
    long.sleep_ms = 8_000 + pause.as_millis() as u32;
    let in_flight = tokio::spawn(async move {
        let reply = old_client.unary(long).await;
        // Dropping the client closes the old process's last connection.
        drop(old_client);
        (reply, Instant::now())
    });

    let mut new = old.start_upgrade().await;
    // The scenario, not a wait for a condition: the operator's pause between the two steps.
    tokio::time::sleep(pause).await;
    old.signal("QUIT");
    // Throughout the hand-over, new connections keep getting answers.
    let end = Instant::now() + Duration::from_secs(3);
    let mut calls = 0;
    while Instant::now() < end {
        let mut client = new.client().await;
        client
            .unary(request("during"))
            .await
            .expect("a call during the upgrade");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(calls > 10);
    let (reply, last_closed) = in_flight.await.unwrap();
    let reply = reply.expect("the call in flight finishes on the old process");
    assert_eq!(reply.into_inner().message, "started before the upgrade");

    // The old process leaves as soon as its last connection has closed, not after its whole
    // drain_timeout (5 s here); the new one serves.
    let exit = old
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the old process exits");
    let lingered = last_closed.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        lingered < Duration::from_secs(2),
        "exited {lingered:?} after its last connection closed"
    );
    eprintln!("the old process exited {lingered:?} after its last connection closed");
    assert!(
        old.log()
            .contains("upgrade: drained, all connections closed; exiting"),
        "{}",
        old.log()
    );
    let reply = new.client().await.unary(request("after")).await.unwrap();
    assert_eq!(reply.into_inner().message, "after");
    assert!(
        new.wait_exit(Duration::from_millis(10)).await.is_none(),
        "the new process still runs"
    );
    // The new process said once that it waited, and nothing alarming about it.
    let log = new.log();
    assert_eq!(
        log.matches("waiting for the running sluice to hand over its sockets")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("took the listening sockets over"), "{log}");
    assert!(!log.contains(" ERROR ") && !log.contains(" WARN "), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_nobody_hands_sockets_to_warns_then_gives_up() {
    let backend = Echo::start("b1").await;
    let old = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut new = old.start_upgrade().await;
    // No SIGQUIT: the new process warns, then exits 1 once pingora stops waiting (6 s).
    let exit = new
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the waiting process gives up");
    assert!(!exit.success(), "{exit:?}");
    let log = new.log();
    let warned = log
        .find("no sockets from a running sluice yet")
        .expect(&log);
    let failed = log.find("Bootstrap failed").expect(&log);
    assert!(warned < failed, "{log}");
    assert!(!log.contains("No incoming socket transfer"), "{log}");
    // The running process was not disturbed.
    let reply = old.client().await.unary(request("still")).await.unwrap();
    assert_eq!(reply.into_inner().message, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_health_readiness_and_live_backend_state() {
    let b1 = Echo::start("b1").await;
    let b2 = Echo::start("b2").await;
    let sluice = Sluice::start(&Sluice::cluster(
        &[b1.addr, b2.addr],
        "    balancer: round_robin\n",
    ))
    .await;
    assert_eq!(
        support::http_get(sluice.admin, "/healthz").await.unwrap().0,
        200
    );
    assert_eq!(
        support::http_get(sluice.admin, "/readyz").await.unwrap(),
        (200, "ready\n".into())
    );
    let mut client = sluice.client().await;
    for i in 0..10 {
        client.unary(request(&format!("{i}"))).await.unwrap();
    }
    let (status, body) = support::http_get(sluice.admin, "/backends").await.unwrap();
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cluster = &view["clusters"][0];
    assert_eq!(cluster["name"], "echo");
    let backends = cluster["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    for (backend, addr) in backends.iter().zip([b1.addr, b2.addr]) {
        assert_eq!(backend["address"], addr.to_string());
        assert_eq!(backend["state"], "healthy");
        assert_eq!(backend["requests"], 5, "round robin: 5 each of 10");
        assert_eq!(backend["failures"], 0);
        assert_eq!(backend["in_flight"], 0);
        assert_eq!(backend["weight"], 1);
        assert_eq!(backend["source"], "static");
        assert_eq!(backend["upstream_connections"], 1);
        assert!(backend["ewma_latency_ms"].as_f64().unwrap() > 0.0);
    }
    let (status, page) = support::http_get(sluice.admin, "/").await.unwrap();
    assert_eq!(status, 200);
    // The status page is static HTML that draws /backends itself (rendered in a real browser
    // by tests/observability.rs); here: it is served whole, with nothing fetched from outside.
    assert!(page.starts_with("<!doctype html>"), "{page}");
    assert!(page.contains("getJson(\"backends\")"), "{page}");
    assert!(page.contains("getJson(\"backends/history\")"), "{page}");
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "{page}"
    );
    assert_eq!(
        support::http_get(sluice.admin, "/nope").await.unwrap().0,
        404
    );
}

/// `sluice health` (the container's HEALTHCHECK) exits 0 against a running sluice's admin
/// endpoint, asks 0.0.0.0 on loopback, and exits 1 naming the address when nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_health_reports_the_admin_endpoint() {
    let b1 = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[b1.addr], "")).await;
    let health = |admin: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["health", "--timeout", "2s"])
            .env("SLUICE_ADMIN", admin)
            .output()
            .expect("run sluice health")
    };
    let up = health(sluice.admin.to_string());
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let unspecified = health(format!("0.0.0.0:{}", sluice.admin.port()));
    assert!(unspecified.status.success());
    let refused = support::RefusedAddrs::new(1);
    let down = health(refused.addrs[0].to_string());
    assert_eq!(down.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(
        stderr.contains(&format!("http://{}/healthz", refused.addrs[0])),
        "{stderr}"
    );
    // Something that is not sluice's admin endpoint on the port: the gRPC listener.
    let wrong = health(sluice.addr.to_string());
    assert_eq!(wrong.status.code(), Some(1));
}
