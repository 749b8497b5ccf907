//! Backends discovered from a real etcd, in the formats Go services write: found the moment
//! they register, dropped the moment they go, and still served while etcd itself is down.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use support::etcd::{etcd_cluster, keys, naming_value, put_leased, Etcd, Relay};
use support::{request, Echo, EchoProcess, Sluice};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// Makes `n` unary calls and counts the answers per backend id; panics on a failed call.
async fn spread(sluice: &Sluice, n: usize) -> HashMap<String, usize> {
    let mut client = sluice.client().await;
    let mut seen = HashMap::new();
    for i in 0..n {
        let reply = client
            .unary(request(&format!("call {i}")))
            .await
            .unwrap_or_else(|status| panic!("call {i} failed: {status:?}"));
        *seen.entry(reply.into_inner().backend_id).or_default() += 1;
    }
    seen
}

/// Calls until backend `id` answers one; returns how long that took.
async fn until_served_by(sluice: &Sluice, id: &str, budget: Duration) -> Duration {
    let mut client = sluice.client().await;
    let start = Instant::now();
    while start.elapsed() < budget {
        if let Ok(reply) = client.unary(request("probe")).await {
            if reply.into_inner().backend_id == id {
                return start.elapsed();
            }
        }
    }
    panic!(
        "backend {id} got no call within {budget:?}:\n{}",
        sluice.log()
    );
}

/// Register, serve, deregister and expire, through one format's writer.
async fn register_deregister_and_expire(
    format: &str,
    write: fn(SocketAddr, i64) -> (String, String),
) {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let lease_a = kv.lease_grant(60, None).await.unwrap().id();
    let (key_a, value_a) = write(a.addr, lease_a);
    kv.put(
        key_a.as_str(),
        value_a,
        Some(etcd_client::PutOptions::new().with_lease(lease_a)),
    )
    .await
    .unwrap();
    let sluice = Sluice::start(&etcd_cluster(&etcd.url(), "services/echo", format, "")).await;
    assert_eq!(
        spread(&sluice, 10).await,
        HashMap::from([("a".to_string(), 10)])
    );

    // Register: B is served as soon as its key is written.
    let lease_b = kv.lease_grant(60, None).await.unwrap().id();
    let (key_b, value_b) = write(b.addr, lease_b);
    kv.put(
        key_b.as_str(),
        value_b,
        Some(etcd_client::PutOptions::new().with_lease(lease_b)),
    )
    .await
    .unwrap();
    let took = until_served_by(&sluice, "b", WAIT).await;
    eprintln!("{format}: etcd put -> first call served by the new backend: {took:?}");

    // Deregister: A's key is deleted; no new call goes there.
    kv.delete(key_a.as_str(), None).await.unwrap();
    assert!(
        sluice.wait_backends("echo", &[b.addr], WAIT).await,
        "{}",
        sluice.log()
    );
    assert_eq!(
        spread(&sluice, 10).await,
        HashMap::from([("b".to_string(), 10)])
    );

    // Lease expiry: C comes with a 2 s lease that nobody keeps alive.
    let lease_c = kv.lease_grant(2, None).await.unwrap().id();
    let (key_c, value_c) = write(c.addr, lease_c);
    kv.put(
        key_c.as_str(),
        value_c,
        Some(etcd_client::PutOptions::new().with_lease(lease_c)),
    )
    .await
    .unwrap();
    until_served_by(&sluice, "c", WAIT).await;
    assert!(
        sluice.wait_backends("echo", &[b.addr], WAIT).await,
        "C outlived its lease:\n{}",
        sluice.log()
    );
    assert_eq!(
        spread(&sluice, 10).await,
        HashMap::from([("b".to_string(), 10)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_naming_register_deregister_and_lease_expiry() {
    // What go.etcd.io/etcd/client/v3/naming/endpoints writes: key PREFIX/ADDR, JSON value.
    register_deregister_and_expire("etcd-naming", |addr, _| {
        (format!("services/echo/{addr}"), naming_value(addr, "null"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_register_deregister_and_lease_expiry() {
    // What go-zero's core/discov writes: key PREFIX/<lease id>, the bare address.
    register_deregister_and_expire("plain", |addr, lease| {
        (format!("services/echo/{lease}"), addr.to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_sharing_the_leading_characters_is_ignored() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (mine, canary, late) = (
        Echo::start("mine").await,
        Echo::start("canary").await,
        Echo::start("late").await,
    );
    put_leased(
        &mut kv,
        &format!("services/echo/{}", mine.addr),
        &naming_value(mine.addr, "null"),
        60,
    )
    .await;
    put_leased(
        &mut kv,
        "services/echo-canary/1",
        &naming_value(canary.addr, "null"),
        60,
    )
    .await;
    let sluice = Sluice::start(&etcd_cluster(&etcd.url(), "services/echo", "auto", "")).await;
    assert_eq!(
        sluice.backends_of("echo").await,
        vec![(mine.addr.to_string(), 1)]
    );
    // Also while watching: the canary write comes first, the one under our prefix second;
    // once the second shows, the first has been passed over.
    put_leased(
        &mut kv,
        "services/echo-canary/2",
        &naming_value(canary.addr, "null"),
        60,
    )
    .await;
    put_leased(
        &mut kv,
        "services/echo/late",
        &naming_value(late.addr, "null"),
        60,
    )
    .await;
    assert!(
        sluice
            .wait_backends("echo", &[mine.addr, late.addr], WAIT)
            .await,
        "{}",
        sluice.log()
    );
    let seen = spread(&sluice, 20).await;
    assert!(!seen.contains_key("canary"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_value_is_logged_once_and_skipped_while_the_others_serve() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    put_leased(&mut kv, "services/echo/garbage", "{\"Addr\": not json", 60).await;
    put_leased(
        &mut kv,
        &format!("services/echo/{}", a.addr),
        &naming_value(a.addr, "null"),
        60,
    )
    .await;
    let sluice = Sluice::start(&etcd_cluster(&etcd.url(), "services/echo", "auto", "")).await;
    assert_eq!(
        sluice.backends_of("echo").await,
        vec![(a.addr.to_string(), 1)]
    );
    assert_eq!(
        spread(&sluice, 10).await,
        HashMap::from([("a".to_string(), 10)])
    );

    // A bad value arriving through the watch, next to a good one.
    put_leased(
        &mut kv,
        "services/echo/zero-weight",
        &naming_value(b.addr, r#"{"weight":0}"#),
        60,
    )
    .await;
    put_leased(
        &mut kv,
        &format!("services/echo/{}", b.addr),
        &naming_value(b.addr, "null"),
        60,
    )
    .await;
    assert!(
        sluice.wait_backends("echo", &[a.addr, b.addr], WAIT).await,
        "{}",
        sluice.log()
    );
    let seen = spread(&sluice, 20).await;
    assert_eq!(seen.values().sum::<usize>(), 20);

    let log = sluice.log();
    let logged = |key: &str| {
        log.lines()
            .filter(|l| l.contains("cannot be decoded") && l.contains(key))
            .count()
    };
    assert_eq!(logged("services/echo/garbage"), 1, "{log}");
    assert_eq!(logged("services/echo/zero-weight"), 1, "{log}");
    assert!(
        sluice
            .metrics()
            .await
            .contains("sluice_discovery_invalid_values{cluster=\"echo\"} 2"),
        "{}",
        sluice.metrics().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_retried_around_until_its_lease_expires() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let mut backends = [
        EchoProcess::start("b1").await,
        EchoProcess::start("b2").await,
        EchoProcess::start("b3").await,
    ];
    // b2's registration lives on a 3 s lease, kept alive by a task that dies with b2, as a
    // self-registering Go service's would.
    let mut b2_keepalive = None;
    for (i, backend) in backends.iter().enumerate() {
        let key = format!("services/echo/{}", backend.addr);
        let ttl = if i == 1 { 3 } else { 60 };
        let lease = put_leased(&mut kv, &key, &naming_value(backend.addr, "null"), ttl).await;
        if i == 1 {
            let mut client = etcd.client().await;
            let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.unwrap();
            b2_keepalive = Some(tokio::spawn(async move {
                // Bounded: 120 refreshes, far longer than the test.
                for _ in 0..120 {
                    if keeper.keep_alive().await.is_err() || answers.message().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }));
        }
    }
    let sluice = Sluice::start(&etcd_cluster(
        &etcd.url(),
        "services/echo",
        "etcd-naming",
        "    balancer: round_robin\n",
    ))
    .await;
    assert_eq!(spread(&sluice, 30).await.len(), 3);

    backends[1].kill();
    if let Some(task) = b2_keepalive {
        task.abort();
    }
    let victim = backends[1].addr;
    // Wait until sluice has read the dead connection's EOF (see resilience.rs: a call sent
    // before then may have reached the backend, so it is rightly not retried).
    assert!(
        wait_no_connections(&sluice, &victim.to_string()).await,
        "sluice never noticed b2's connection close"
    );

    // The key still names b2, and every call succeeds anyway, by transparent retry.
    let seen = spread(&sluice, 60).await;
    assert!(!seen.contains_key("b2"), "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 60);
    assert!(
        keys(&mut kv, "services/echo/")
            .await
            .contains(&format!("services/echo/{victim}")),
        "the lease expired before the calls were made; the test proves nothing"
    );

    // When the lease expires, b2 is gone.
    let survivors = [backends[0].addr, backends[2].addr];
    assert!(
        sluice.wait_backends("echo", &survivors, WAIT).await,
        "{}",
        sluice.log()
    );
    assert_eq!(spread(&sluice, 20).await.values().sum::<usize>(), 20);
}

async fn wait_no_connections(sluice: &Sluice, address: &str) -> bool {
    for _ in 0..500 {
        let view = sluice.backends_view().await;
        let connections = view["clusters"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["address"] == address)
            .map(|b| b["upstream_connections"].as_u64().unwrap_or(0));
        if connections == Some(0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
