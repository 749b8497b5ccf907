//! What an operator sees: `/metrics` (read with a Prometheus text parser), the access log,
//! and the status page in a real headless browser.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use support::{request, Echo, EchoProcess, Sluice};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// A parsed `/metrics` page.
struct Metrics(Scrape);

impl Metrics {
    async fn scrape(sluice: &Sluice) -> Metrics {
        let text = sluice.metrics().await;
        assert_well_formed(&text);
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Metrics(Scrape::parse(lines).expect("/metrics parses as Prometheus text"))
    }

    /// Scrapes until `ready` holds (at most 5 s), and returns the last scrape. A call is
    /// counted just after its last frame went to the client, so on a loaded machine a client
    /// can scrape before its own last call is in.
    async fn scrape_when(sluice: &Sluice, ready: impl Fn(&Metrics) -> bool) -> Metrics {
        let mut m = Metrics::scrape(sluice).await;
        for _ in 0..50 {
            if ready(&m) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            m = Metrics::scrape(sluice).await;
        }
        m
    }

    /// The sum over series of `name` whose labels include `labels`. Histograms count their
    /// observations.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
                Value::Summary(_) => 0.0,
            })
            .sum()
    }

    /// Every value the label `label` takes in series of `name`.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| s.labels.get(label).map(str::to_string))
            .collect();
        values.sort();
        values.dedup();
        values
    }

    /// The metric names on the page, histograms under their base name.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.samples.iter().map(|s| s.metric.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// What a lenient parser lets pass but Prometheus rejects: a family announced twice, or the
/// same series twice.
fn assert_well_formed(text: &str) {
    let mut types = std::collections::HashSet::new();
    let mut series = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            assert!(
                types.insert(name.to_string()),
                "family {name} announced twice"
            );
        } else if !line.starts_with('#') && !line.is_empty() {
            let key = line.rsplit_once(' ').map_or(line, |(k, _)| k);
            assert!(series.insert(key.to_string()), "series {key} appears twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_call_per_backend_and_code() {
    let backends = [
        Echo::start("b1").await,
        Echo::start("b2").await,
        Echo::start("b3").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let config = format!(
        "{}routes:\n  - match: {{ prefix: \"/echo.v1.\" }}\n    cluster: echo\n",
        Sluice::cluster(
            &addrs,
            "    balancer: round_robin\n    max_deadline: 300ms\n"
        )
    );
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;

    // 30 answered OK, 6 answered NotFound by the backend, 2 cut by sluice's deadline.
    for i in 0..30 {
        client.unary(request(&format!("ok {i}"))).await.unwrap();
    }
    for _ in 0..6 {
        let mut ask = request("missing");
        ask.fail_code = Code::NotFound as i32;
        let status = client.unary(ask).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    for _ in 0..2 {
        // No client timeout: sluice's max_deadline (300 ms) is the one that passes.
        let mut ask = request("slow");
        ask.sleep_ms = 2_000;
        let status = client.unary(ask).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded);
    }
    // One call no route matches.
    let mut raw = support::RawClient::connect(sluice.addr).await;
    let reply = raw
        .call(
            "POST",
            "/other.v1.Thing/Do",
            &support::GRPC_HEADERS,
            support::grpc_frame(&request("x")),
        )
        .await;
    assert_eq!(reply.grpc_status().as_deref(), Some("12"));

    // All 39 calls counted, the unrouted one included.
    let m = Metrics::scrape_when(&sluice, |m| m.sum("sluice_requests_total", &[]) >= 39.0).await;
    let echo = [("cluster", "echo"), ("grpc_service", "echo.v1.Echo")];
    let requests = |code: &str, origin: &str| {
        let mut labels = echo.to_vec();
        labels.extend([("grpc_code", code), ("origin", origin)]);
        m.sum("sluice_requests_total", &labels)
    };
    assert_eq!(requests("OK", "upstream"), 30.0);
    assert_eq!(requests("NotFound", "upstream"), 6.0);
    assert_eq!(requests("DeadlineExceeded", "proxy"), 2.0);
    let unrouted = [
        ("cluster", "(none)"),
        ("grpc_service", "other.v1.Thing"),
        ("grpc_code", "Unimplemented"),
        ("origin", "proxy"),
    ];
    assert_eq!(m.sum("sluice_requests_total", &unrouted), 1.0);
    assert_eq!(
        m.sum(
            "sluice_rejected_total",
            &[("cluster", "(none)"), ("reason", "no_route")]
        ),
        1.0
    );

    // Per backend: one attempt per call, round robin, summing to the 38 calls sent.
    let per_backend: HashMap<String, f64> = addrs
        .iter()
        .map(|a| {
            let labels = [("cluster", "echo"), ("backend", &*a.to_string())];
            (
                a.to_string(),
                m.sum("sluice_upstream_requests_total", &labels),
            )
        })
        .collect();
    assert_eq!(per_backend.values().sum::<f64>(), 38.0, "{per_backend:?}");
    assert!(per_backend.values().all(|n| *n >= 12.0), "{per_backend:?}");
    assert_eq!(
        m.label_values("sluice_upstream_requests_total", "grpc_code"),
        ["DeadlineExceeded", "NotFound", "OK"]
    );

    // The histograms have the counts.
    assert_eq!(m.sum("sluice_request_duration_seconds", &echo), 38.0);
    assert_eq!(
        m.sum(
            "sluice_upstream_request_duration_seconds",
            &[("cluster", "echo")]
        ),
        38.0
    );
    // The gauges describe the live backends.
    for addr in &addrs {
        let labels = [("cluster", "echo"), ("backend", &*addr.to_string())];
        assert_eq!(m.sum("sluice_backend_up", &labels), 1.0);
        assert_eq!(m.sum("sluice_upstream_in_flight", &labels), 0.0);
        assert_eq!(m.sum("sluice_upstream_connections", &labels), 1.0);
    }
    assert_eq!(m.sum("sluice_backends", &[("cluster", "echo")]), 3.0);
    assert_eq!(
        m.sum("sluice_downstream_connections", &[("listener", "grpc")]),
        2.0
    );
    let names = m.names();
    for name in [
        "sluice_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "sluice_retries_total",
        "sluice_discovery_updates_total",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_leaves_has_no_series() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let sluice = Sluice::start(&Sluice::cluster(&[a.addr, b.addr], "")).await;
    let mut client = sluice.client().await;
    for i in 0..20 {
        client.unary(request(&format!("{i}"))).await.unwrap();
    }
    let gone = format!("backend=\"{}\"", b.addr);
    assert!(sluice.metrics().await.contains(&gone));

    sluice.rewrite_config(&Sluice::cluster(&[a.addr], ""));
    sluice.signal("HUP");
    assert!(sluice.wait_backends("echo", &[a.addr], WAIT).await);
    let text = sluice.metrics().await;
    assert!(!text.contains(&gone), "{text}");
    // The cluster's call counters carry on across the reload.
    let m = Metrics::scrape(&sluice).await;
    assert_eq!(
        m.sum(
            "sluice_requests_total",
            &[("cluster", "echo"), ("grpc_code", "OK")]
        ),
        20.0
    );
}

/// The x-request-id a call without a trace header reached the backend with (the echo backend
/// returns every x-* request header), or `None`.
async fn request_id_upstream(sluice: &Sluice) -> Option<String> {
    let reply = sluice
        .client()
        .await
        .unary(request("untraced"))
        .await
        .unwrap();
    let id = reply.metadata().get("x-request-id")?;
    Some(id.to_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_made_whether_or_not_the_access_log_is_on() {
    let backend = Echo::start("b1").await;
    // No access log: the id is made and forwarded all the same, a UUIDv4 each call.
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let first = request_id_upstream(&sluice)
        .await
        .expect("an x-request-id upstream");
    let second = request_id_upstream(&sluice)
        .await
        .expect("an x-request-id upstream");
    assert_ne!(first, second);
    for id in [&first, &second] {
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
    }
    // A client's own id goes through unchanged.
    let mut ask = tonic::Request::new(request("traced"));
    ask.metadata_mut()
        .insert("x-request-id", "mine-1".parse().unwrap());
    let reply = sluice.client().await.unary(ask).await.unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "mine-1");
    // `request_id: { generate: false }` turns it off.
    let off = format!(
        "{}request_id:\n  generate: false\n",
        Sluice::cluster(&[backend.addr], "")
    );
    let sluice = Sluice::start(&off).await;
    assert_eq!(request_id_upstream(&sluice).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_carries_each_kind_of_trace_id() {
    let backend = Echo::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let config = format!(
        "{}access_log:\n  path: \"{}\"\n",
        Sluice::cluster(&[backend.addr], ""),
        log.display()
    );
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    let kinds = [
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        ("x-request-id", "req-42", "req-42"),
        ("x-b3-traceid", "80f198ee56343ba8", "80f198ee56343ba8"),
        (
            "uber-trace-id",
            "5b8aa5a2d2c872e8:5b8aa5a2d2c872e8:0:1",
            "5b8aa5a2d2c872e8",
        ),
    ];
    for (header, value, _) in kinds {
        let mut ask = tonic::Request::new(request(header));
        ask.metadata_mut().insert(header, value.parse().unwrap());
        client.unary(ask).await.unwrap();
    }
    // No trace header: sluice makes an x-request-id, and the backend receives it (the echo
    // backend returns every x-* request header).
    let reply = client.unary(request("untraced")).await.unwrap();
    let generated = reply
        .metadata()
        .get("x-request-id")
        .expect("the backend got a generated x-request-id")
        .to_str()
        .unwrap()
        .to_string();
    let mut failing = request("failing");
    failing.fail_code = Code::PermissionDenied as i32;
    client.unary(failing).await.unwrap_err();

    let lines = support::wait_until(WAIT, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() == 6)
    })
    .await;
    assert!(lines, "{:?}", std::fs::read_to_string(&log));
    let entries: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    for ((_, _, want), entry) in kinds.iter().zip(&entries) {
        assert_eq!(entry["trace_id"], *want, "{entry}");
    }
    assert_eq!(entries[4]["trace_id"], generated.as_str());
    let first = &entries[0];
    assert_eq!(first["listener"], "grpc");
    assert_eq!(first["path"], "/echo.v1.Echo/Unary");
    assert_eq!(first["cluster"], "echo");
    assert_eq!(first["backend"], backend.addr.to_string());
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["grpc_status"], 0);
    assert_eq!(first["grpc_code"], "OK");
    assert!(first["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first["bytes_in"].as_u64().unwrap() > 0);
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(entries[5]["grpc_status"], 7);
    assert_eq!(entries[5]["origin"], "upstream");
}

/// Renders the status page in headless Chromium and returns its DOM after the script ran.
fn render(admin: std::net::SocketAddr, screenshot: Option<&std::path::Path>) -> String {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1100,420",
        "--virtual-time-budget=3000",
    ]);
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command
        .arg(format!("http://{admin}/"))
        .output()
        .expect("run chromium (Debian package chromium; scripts/setup installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_killed_backend_as_unhealthy() {
    let mut backends = [
        EchoProcess::start("b1").await,
        EchoProcess::start("b2").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(&Sluice::cluster(&addrs, "")).await;
    // Steady traffic, as in production: the page has rates to show, and the dead backend is
    // found by the calls that try it. Bounded: stops with the test, at most 60 s.
    let mut client = sluice.client().await;
    let traffic = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            let _ = client.unary(request("load")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    let admin = sluice.admin;
    let dom = tokio::task::spawn_blocking(move || render(admin, None))
        .await
        .unwrap();
    for addr in &addrs {
        let row = format!("data-backend=\"{addr}\" data-state=\"healthy\"");
        assert!(dom.contains(&row), "{row} not in:\n{dom}");
    }
    // Each backend's unanswered calls against its concurrency limit.
    let limits = dom.matches("data-limit=\"").count();
    assert_eq!(limits, addrs.len(), "{dom}");
    assert!(dom.contains("unanswered of limit"), "{dom}");
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("status.png");
    let path = png.clone();
    tokio::task::spawn_blocking(move || render(admin, Some(&path)))
        .await
        .unwrap();
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);

    backends[1].kill();
    let dead = format!("data-backend=\"{}\" data-state=\"unhealthy\"", addrs[1]);
    let killed_at = Instant::now();
    let mut seen = false;
    while killed_at.elapsed() < Duration::from_secs(10) {
        let dom = tokio::task::spawn_blocking(move || render(admin, None))
            .await
            .unwrap();
        if dom.contains(&dead) {
            seen = true;
            break;
        }
    }
    traffic.abort();
    assert!(seen, "the killed backend never showed as unhealthy");
    eprintln!(
        "killed backend shown unhealthy after {:?}",
        killed_at.elapsed()
    );
}

/// The five-minute row of `address`: its charts.
fn chart_row(dom: &str, address: std::net::SocketAddr) -> Option<&str> {
    let row_start = dom.find(&format!("<tr data-backend=\"{address}\">"))?;
    let row = &dom[row_start..];
    Some(&row[..row.find("</tr>")?])
}

/// The value of `data-last` on chart `kind` in the five-minute row of `address`.
fn chart_last(dom: &str, address: std::net::SocketAddr, kind: &str) -> Option<String> {
    let row = chart_row(dom, address)?;
    let chart = &row[row.find(&format!("data-chart=\"{kind}\""))?..];
    let value = &chart[chart.find("data-last=\"")? + "data-last=\"".len()..];
    Some(value[..value.find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_charts_each_backends_last_five_minutes() {
    let good = Echo::start("good").await;
    let broken = Echo::start_failing("broken", Code::Unavailable).await;
    let extra =
        "    balancer: round_robin\n    outlier_detection: { consecutive_failures: 1000 }\n";
    let sluice = Sluice::start(&Sluice::cluster(&[good.addr, broken.addr], extra)).await;
    let mut client = sluice.client().await;
    // Calls until the first 5 s bin with calls has closed (bounded: 20 s).
    let mut binned = false;
    let mut calls = 0u64;
    let end = Instant::now() + Duration::from_secs(20);
    while !binned && Instant::now() < end {
        for _ in 0..20 {
            let _ = client.unary(request("x")).await;
            calls += 1;
        }
        let (status, body) = support::http_get(sluice.admin, "/backends/history")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let history: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(history["bin_seconds"], 5);
        let requests = &history["clusters"][0]["backends"][1]["requests"];
        let binned_calls: u64 = requests
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_u64())
            .sum();
        assert!(binned_calls <= calls);
        binned = binned_calls > 0;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(binned, "no history bin with calls in 20 s");
    let admin = sluice.admin;
    let dom = tokio::task::spawn_blocking(move || render(admin, None))
        .await
        .unwrap();
    let last = |address, kind| {
        chart_last(&dom, address, kind)
            .unwrap_or_else(|| panic!("no {kind} chart for {address} in:\n{dom}"))
    };
    // Round robin: half the calls each; every call on `broken` failed, none on `good`.
    let share: f64 = last(broken.addr, "share").parse().unwrap();
    assert!((0.4..=0.6).contains(&share), "{share}");
    assert_eq!(last(broken.addr, "errors"), "1");
    assert_eq!(last(good.addr, "errors"), "0");
    // A zero error ratio is drawn in a neutral colour; only what is above zero is red.
    let bad = |address| chart_row(&dom, address).unwrap().contains("class=\"bad\"");
    assert!(bad(broken.addr) && !bad(good.addr), "{dom}");
    let p99: f64 = last(good.addr, "p99").parse().unwrap();
    assert!(p99 > 0.0 && p99 <= 1000.0, "{p99}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_use_only_metrics_sluice_exports() {
    // A TLS backend and a client certificate, so the TLS series exist too.
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::TestCa::new("test CA");
    let backend_cert = ca.server(dir.path(), "backend", &["backend.test"]);
    let client_cert = ca.client(dir.path(), "sluice", "sluice", None);
    let ca_file = ca.write(dir.path(), "ca.pem");
    let backend = Echo::start_tls("b1", &backend_cert.cert_pem, &backend_cert.key_pem).await;
    let tls = format!(
        "    tls: {{ ca_file: \"{}\", server_name: backend.test, cert_file: \"{}\", key_file: \"{}\" }}\n",
        ca_file.display(),
        client_cert.cert_file.display(),
        client_cert.key_file.display()
    );
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], &tls)).await;
    let mut client = sluice.client().await;
    client.unary(request("one call")).await.unwrap();
    let exported = Metrics::scrape(&sluice).await.names();

    let files = [
        "docker/grafana/sluice-dashboard.json",
        "docker/prometheus/alerts.yml",
    ];
    let mut used = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("sluice_") {
            let name: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[start + name.len()..];
            used.push((file, name));
        }
    }
    assert!(used.len() > 20, "{used:?}");
    for (file, name) in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            exported.iter().any(|e| e == name || e == base),
            "{file} uses {name}, which sluice does not export: {exported:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_counts_once_with_one_attempt_per_backend() {
    let refusing = support::RefusingBackend::start().await;
    let healthy = Echo::start("healthy").await;
    let config = Sluice::cluster(
        &[refusing.addr, healthy.addr],
        "    balancer: round_robin\n    retry: { max_attempts: 2, budget_ratio: 1.0 }\n",
    );
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    for i in 0..4 {
        client.unary(request(&format!("{i}"))).await.unwrap();
    }
    let echo = [("cluster", "echo")];
    let m = Metrics::scrape_when(&sluice, |m| m.sum("sluice_requests_total", &echo) >= 4.0).await;
    assert_eq!(m.sum("sluice_requests_total", &echo), 4.0);
    let refused = [
        ("cluster", "echo"),
        ("backend", &*refusing.addr.to_string()),
        ("grpc_code", "Unavailable"),
    ];
    let retries = m.sum("sluice_retries_total", &echo);
    // Round robin sends every other first attempt to the refusing backend; each of those is
    // retried on the healthy one.
    assert!(retries >= 1.0, "no retry happened");
    assert_eq!(m.sum("sluice_upstream_requests_total", &refused), retries);
    let healthy_ok = [
        ("cluster", "echo"),
        ("backend", &*healthy.addr.to_string()),
        ("grpc_code", "OK"),
    ];
    assert_eq!(m.sum("sluice_upstream_requests_total", &healthy_ok), 4.0);
}

/// When a test run of sluice may stop.
enum Until<'a> {
    /// It has logged this.
    Logged(&'a str),
    /// Its admin endpoint (read from the log) answers `/readyz` with 200.
    Ready,
}

/// Runs sluice with `log` as its `log:` block until it has logged `until` (at most 10 s); returns
/// what it wrote to stderr.
fn stderr_of_a_run(log: &str, until: &str) -> String {
    stderr_of_a_run_until(log, Until::Logged(until), Duration::from_secs(10))
}

/// Whether the admin endpoint named in `log` answers `/readyz` with 200.
fn ready(log: &str) -> bool {
    use std::io::{Read, Write};
    let admin = log
        .lines()
        .find(|l| l.contains("admin endpoint"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.trim().trim_matches('"').to_string());
    let Some(Ok(mut tcp)) = admin.map(std::net::TcpStream::connect) else {
        return false;
    };
    let request = b"GET /readyz HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    tcp.write_all(request).is_ok()
        && tcp.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

fn stderr_of_a_run_until(log: &str, until: Until<'_>, budget: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    let text = format!(
        "listeners:\n  - name: grpc\n    address: \"127.0.0.1:0\"\nadmin:\n  address: \"127.0.0.1:0\"\n\
         upgrade_sock: \"{}\"\nlog: {log}\nclusters:\n  - name: echo\n    discovery:\n      static: [\"127.0.0.1:1\"]\n",
        dir.path().join("upgrade.sock").display()
    );
    std::fs::write(&config, text).unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut output = String::new();
    while started.elapsed() < budget {
        output = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let done = match until {
            Until::Logged(text) => output.contains(text),
            Until::Ready => ready(&output),
        };
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Read again once it has stopped: no line is half-written now.
    std::fs::read_to_string(&stderr_path).unwrap_or(output)
}

#[test]
fn json_logs_are_one_object_per_line_with_level_target_message_and_fields() {
    let output = stderr_of_a_run("{ format: json }", "admin endpoint");
    let lines: Vec<serde_json::Value> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let listening = lines
        .iter()
        .find(|l| l["message"] == "listening")
        .unwrap_or_else(|| panic!("no listening line in {output}"));
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert_eq!(listening["target"], "sluice::server", "{listening}");
    assert_eq!(listening["listener"], "grpc", "{listening}");
    assert!(listening["timestamp"].is_string(), "{listening}");
    assert!(listening["address"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
}

#[test]
fn pingora_start_up_lines_stay_out_of_the_default_log() {
    // Until /readyz answers 200: every service, the listener's last, has started by then.
    let output = stderr_of_a_run_until("{ level: info }", Until::Ready, Duration::from_secs(10));
    assert!(output.contains("listening listener=grpc"), "{output}");
    assert!(!output.contains("Starting service"), "{output}");
    // Asked for by name, they are there.
    let output = stderr_of_a_run("{ level: \"info,pingora_core=info\" }", "Starting service");
    assert!(output.contains("Starting service"), "{output}");
}

/// The status page's table row of `address`, as the browser rendered it.
fn table_row(dom: &str, address: std::net::SocketAddr) -> Option<&str> {
    let row_start = dom.find(&format!("<tr data-backend=\"{address}\" data-state="))?;
    let row = &dom[row_start..];
    Some(&row[..row.find("</tr>")?])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_marks_the_slow_backend_and_only_it() {
    let backends = [
        Echo::start("b1").await,
        Echo::start("b2").await,
        Echo::start_with_delay("slow", Duration::from_millis(300)).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(&Sluice::cluster(&addrs, "")).await;
    let admin = sluice.admin;

    // Before any call: no backend stands out, and no share is drawn from nothing.
    let dom = tokio::task::spawn_blocking(move || render(admin, None))
        .await
        .unwrap();
    assert!(dom.contains("too few for a share"), "{dom}");
    assert!(!dom.contains("class=\"fill\""), "{dom}");

    // Steady traffic from four callers, as in production. Bounded: at most 40 s.
    let mut traffic = Vec::new();
    for _ in 0..4 {
        let mut client = sluice.client().await;
        traffic.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(40);
            while Instant::now() < end {
                let _ = client.unary(request("load")).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let started = Instant::now();
    let mut marked = None;
    while marked.is_none() && started.elapsed() < Duration::from_secs(10) {
        let dom = tokio::task::spawn_blocking(move || render(admin, None))
            .await
            .unwrap();
        for fast in &addrs[..2] {
            let row = table_row(&dom, *fast).unwrap_or_else(|| panic!("no row for {fast}:\n{dom}"));
            assert!(
                row.contains("data-mark=\"\""),
                "a fast backend is marked: {row}"
            );
        }
        let slow = table_row(&dom, addrs[2]).expect("a row for the slow backend");
        if slow.contains("data-mark=\"slow\"") {
            marked = Some((started.elapsed(), dom));
        }
    }
    let Some((after, dom)) = marked else {
        panic!("the slow backend was not marked slow within 10 s");
    };
    eprintln!("slow backend marked after {after:?}");
    // The badge says why, and the share has its sample size.
    let slow = table_row(&dom, addrs[2]).unwrap();
    assert!(slow.contains(">slow</span>"), "{slow}");
    assert!(
        dom.contains("% of ") && dom.contains("class=\"fill\""),
        "{dom}"
    );
    if let Some(path) = std::env::var_os("STATUS_PAGE_SCREENSHOT") {
        // For docs/: `STATUS_PAGE_SCREENSHOT=docs/status-page-slow.png cargo nextest run ...`
        let path = std::path::PathBuf::from(path);
        tokio::task::spawn_blocking(move || render(admin, Some(&path)))
            .await
            .unwrap();
    }
    for task in traffic {
        task.abort();
    }
}

#[tokio::test]
async fn the_status_page_shows_a_backend_the_operator_drained() {
    let backends = [Echo::start("b1").await, Echo::start("b2").await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(&Sluice::cluster(&addrs, "")).await;
    let admin = sluice.admin.to_string();
    let backend = addrs[0].to_string();
    let drain = ["ctl", "--admin", &admin, "drain", "echo", &backend];
    let (ok, out) = support::sluice_command(&drain);
    assert!(ok, "{out}");
    let admin = sluice.admin;
    let dom = tokio::task::spawn_blocking(move || render(admin, None))
        .await
        .unwrap();
    let row = table_row(&dom, addrs[0]).unwrap_or_else(|| panic!("no row:\n{dom}"));
    assert!(row.contains("data-state=\"drained\""), "{row}");
    assert!(row.contains(">drained<"), "{row}");
    assert!(row.contains("an operator drained it"), "{row}");
    let other = table_row(&dom, addrs[1]).expect("the other row");
    assert!(other.contains("data-state=\"healthy\""), "{other}");
}
