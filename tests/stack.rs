//! The deployment picture as plain processes: etcd, three echo backends each registered by a
//! `sluice register` process, sluice discovering them through etcd, and a real Prometheus
//! (Debian package `prometheus`) scraping sluice with `docker/prometheus/alerts.yml` loaded.
//! Prometheus must evaluate every query of the Grafana dashboard in `docker/grafana/` with data,
//! and load every alert rule. Skipped, with a message, when `prometheus` is not installed.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::etcd::{etcd_cluster, Etcd};
use support::{http_get, request, unused_port, EchoProcess, Sluice};

/// Dashboard queries that have data only when sluice turns calls away.
const ONLY_WHEN_REJECTING: &[&str] = &["sluice_rejected_total"];

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn register(etcd: &Etcd, backend: SocketAddr, log: &std::path::Path) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("register")
        .args(["--etcd", &etcd.url(), "--prefix", "services/echo"])
        .args(["--addr", &backend.to_string(), "--ttl", "10s"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("register log"))
        .spawn()
        .expect("spawn sluice register");
    Killed(child)
}

fn start_prometheus(dir: &std::path::Path, sluice_admin: SocketAddr, port: u16) -> Killed {
    std::fs::copy("docker/prometheus/alerts.yml", dir.join("alerts.yml")).expect("alerts");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{sluice_admin}\"]\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
        .spawn()
        .expect("spawn prometheus");
    Killed(child)
}

/// The dashboard's PromQL, with its variables filled in as Grafana would.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string("docker/grafana/sluice-dashboard.json").expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    let exprs = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string));
    exprs
        .map(|e| {
            e.replace("$cluster", ".*")
                .replace("$__rate_interval", "10s")
        })
        .collect()
}

/// An HTTP/1.1 body as sent, chunked or not, as its bytes.
fn dechunk(body: &str) -> String {
    if body.starts_with('{') {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// Runs `query` on Prometheus; the number of series in the answer, or `None` on an error.
async fn series(prometheus: SocketAddr, query: &str) -> Option<usize> {
    let encoded = percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC);
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={encoded}"))
        .await
        .ok()?;
    let answer: serde_json::Value = serde_json::from_str(&dechunk(&body)).ok()?;
    (status == 200 && answer["status"] == "success")
        .then(|| answer["data"]["result"].as_array().map_or(0, Vec::len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_stack_and_evaluates_every_dashboard_query() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: `prometheus` is not installed (Debian package prometheus)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start().await;
    let mut backends = Vec::new();
    let mut registrations = Vec::new();
    for id in ["b1", "b2", "b3"] {
        let backend = EchoProcess::start(id).await;
        let log = dir.path().join(format!("register-{id}.log"));
        registrations.push(register(&etcd, backend.addr, &log));
        backends.push(backend);
    }
    let sluice = Sluice::start(&etcd_cluster(&etcd.url(), "services/echo", "auto", "")).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let all_three = sluice
        .wait_backends("echo", &addrs, Duration::from_secs(15))
        .await;
    assert!(
        all_three,
        "sluice did not discover the three registered backends"
    );

    let port = unused_port();
    let _prometheus = start_prometheus(dir.path(), sluice.admin, port);
    let prometheus: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Traffic while Prometheus scrapes: every dashboard query needs some.
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let mut client = sluice.client().await;
    let mut missing: Vec<String> = queries.clone();
    for _ in 0..120 {
        for i in 0..20 {
            let mut call = request(&format!("call {i}"));
            // Some failures, for the error-ratio panel.
            if i % 10 == 0 {
                call.fail_code = tonic::Code::Internal as i32;
            }
            let _ = client.unary(call).await;
        }
        let mut still = Vec::new();
        for query in missing {
            let skip = ONLY_WHEN_REJECTING.iter().any(|m| query.contains(m));
            let wanted = if skip { 0 } else { 1 };
            if series(prometheus, &query).await.is_none_or(|n| n < wanted) {
                still.push(query);
            }
        }
        missing = still;
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        missing.is_empty(),
        "queries without data after 30 s: {missing:#?}\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );

    // Every alert rule in docker/prometheus/alerts.yml is loaded.
    let (_, rules) = http_get(prometheus, "/api/v1/rules").await.unwrap();
    let rules: serde_json::Value = serde_json::from_str(&dechunk(&rules)).unwrap();
    let loaded: HashSet<String> = (rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default())
    .iter()
    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
    .filter_map(|r| r["name"].as_str().map(str::to_string))
    .collect();
    let alerts = std::fs::read_to_string("docker/prometheus/alerts.yml").unwrap();
    let written: HashSet<String> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_string())
        .collect();
    assert!(!written.is_empty());
    assert_eq!(loaded, written, "alert rules loaded by Prometheus");
    drop(registrations);
}
