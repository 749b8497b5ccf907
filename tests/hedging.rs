//! Hedged requests: a second attempt on another backend when the first is slow; the first
//! answer wins and the loser is cancelled; hedges stay within their budget.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{request, wait_until, Echo, Sluice};

/// A slow and a fast backend, round robin, every call hedged after `delay` (both budgets
/// always allow unless `budget` says otherwise).
async fn slow_and_fast(hedging: &str) -> (Echo, Echo, Sluice) {
    let slow = Echo::start_with_delay("slow", Duration::from_secs(2)).await;
    let fast = Echo::start("fast").await;
    let config = format!(
        "{}routes:\n  - name: echo\n    cluster: echo\n    hedging: {hedging}\n",
        Sluice::cluster(
            &[slow.addr, fast.addr],
            "    balancer: round_robin\n    retry: { budget_ratio: 1.0 }\n    outlier_detection: off\n"
        )
    );
    let sluice = Sluice::start(&config).await;
    (slow, fast, sluice)
}

fn metric(metrics: &str, name_and_labels: &str) -> f64 {
    let prefix = format!("{name_and_labels} ");
    (metrics.lines())
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_attempt_is_hedged_and_the_first_answer_wins() {
    let hedging = "{ delay: 30ms, max_attempts: 2, budget_ratio: 1.0 }";
    let (slow, fast, sluice) = slow_and_fast(hedging).await;
    let mut client = sluice.client().await;
    let mut hedged = 0;
    for i in 0..6 {
        let started = Instant::now();
        let reply = client.unary(request(&format!("call {i}"))).await.unwrap();
        let took = started.elapsed();
        assert_eq!(reply.get_ref().backend_id, "fast", "call {i}");
        assert!(took < Duration::from_secs(1), "call {i} took {took:?}");
        if let Some(attempts) = reply.metadata().get("x-echo-previous-attempts") {
            assert_eq!(attempts, "1", "the hedge names the attempt before it");
            assert!(
                took >= Duration::from_millis(30),
                "hedged before the delay: {took:?}"
            );
            hedged += 1;
        }
    }
    // Round robin sent half of the first attempts to the slow backend.
    assert!(hedged >= 2, "{hedged} calls hedged");
    // Each loser was cancelled: the slow backend's handler saw the stream reset.
    let cancelled = wait_until(Duration::from_secs(5), || {
        slow.stats.cancelled.load(Ordering::Relaxed) >= hedged
    })
    .await;
    assert!(
        cancelled,
        "{} of {hedged} cancelled",
        slow.stats.cancelled.load(Ordering::Relaxed)
    );
    assert_eq!(fast.stats.cancelled.load(Ordering::Relaxed), 0);
    let metrics = sluice.metrics().await;
    let won = metric(
        &metrics,
        "sluice_hedges_total{cluster=\"echo\",result=\"won\"}",
    );
    assert_eq!(won, hedged as f64, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_first_answer_cancels_the_hedge() {
    // Both backends answer in 150 ms; hedges go out after 20 ms: every hedge loses.
    let one = Echo::start_with_delay("one", Duration::from_millis(150)).await;
    let two = Echo::start_with_delay("two", Duration::from_millis(150)).await;
    let config = format!(
        "{}routes:\n  - name: echo\n    cluster: echo\n    hedging: {{ delay: 20ms, budget_ratio: 1.0 }}\n",
        Sluice::cluster(&[one.addr, two.addr], "    retry: { budget_ratio: 1.0 }\n")
    );
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    for i in 0..4 {
        let reply = client.unary(request(&format!("call {i}"))).await.unwrap();
        assert!(reply.metadata().get("x-echo-previous-attempts").is_none());
    }
    let lost = wait_until(Duration::from_secs(5), || {
        let cancelled = one.stats.cancelled.load(Ordering::Relaxed)
            + two.stats.cancelled.load(Ordering::Relaxed);
        cancelled >= 4
    })
    .await;
    assert!(
        lost,
        "every hedge is cancelled when the first attempt answers"
    );
    let metrics = sluice.metrics().await;
    let lost = metric(
        &metrics,
        "sluice_hedges_total{cluster=\"echo\",result=\"lost\"}",
    );
    assert_eq!(lost, 4.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_stay_within_their_budget() {
    // A budget of 10% of calls, plus the floor of 10.
    let hedging = "{ delay: 10ms, budget_ratio: 0.1 }";
    let (_slow, _fast, sluice) = slow_and_fast(hedging).await;
    let mut client = sluice.client().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.unary(request(&format!("call {i}"))).await.is_ok()
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap());
    }
    client.unary(request("last")).await.unwrap();
    let metrics = sluice.metrics().await;
    let hedges: f64 = ["won", "lost", "failed"]
        .iter()
        .map(|r| {
            metric(
                &metrics,
                &format!("sluice_hedges_total{{cluster=\"echo\",result=\"{r}\"}}"),
            )
        })
        .sum();
    // About half of 101 calls start on the slow backend, and all of them want a hedge.
    assert!(hedges >= 10.0, "{metrics}");
    assert!(
        hedges <= 10.0 + 0.1 * 101.0 + 1.0,
        "{hedges} hedges: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hedging_nothing_is_hedged() {
    let slow = Echo::start_with_delay("slow", Duration::from_millis(200)).await;
    let fast = Echo::start("fast").await;
    let config = Sluice::cluster(&[slow.addr, fast.addr], "    balancer: round_robin\n");
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    let mut from_slow = 0;
    for i in 0..4 {
        let reply = client.unary(request(&format!("call {i}"))).await.unwrap();
        from_slow += usize::from(reply.get_ref().backend_id == "slow");
    }
    assert_eq!(from_slow, 2);
    assert_eq!(slow.stats.cancelled.load(Ordering::Relaxed), 0);
    assert!(!sluice.metrics().await.contains("sluice_hedges_total{"));
}
