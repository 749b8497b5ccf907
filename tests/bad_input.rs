//! Bad input gets a clear answer naming what was wrong, and never disturbs other streams:
//! HTTP/1 on the gRPC port, non-gRPC HTTP/2 requests, invalid config files.

mod support;

use std::process::Command;

use support::{grpc_frame, request, Echo, RawClient, Sluice, GRPC_HEADERS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_on_the_grpc_port_gets_a_readable_refusal() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut tcp = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 505"), "{reply}");
    assert!(reply.contains("gRPC over HTTP/2 only"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_grpc_streams_get_an_http_error_and_the_connection_keeps_serving() {
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = RawClient::connect(sluice.addr).await;

    let get = client
        .call("GET", "/echo.v1.Echo/Unary", &[], Vec::new())
        .await;
    assert_eq!(get.status, 405);
    assert!(String::from_utf8_lossy(&get.body).contains("gRPC calls use POST"));

    let json = client
        .call(
            "POST",
            "/echo.v1.Echo/Unary",
            &[("content-type", "application/json")],
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(json.status, 415);
    let text = String::from_utf8_lossy(&json.body);
    assert!(text.contains("\"application/json\" is not gRPC"), "{text}");

    // The same connection still carries a real gRPC call.
    let ok = client
        .call(
            "POST",
            "/echo.v1.Echo/Unary",
            &GRPC_HEADERS,
            grpc_frame(&request("still here")),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.grpc_status().as_deref(), Some("0"), "{ok:?}");
    assert_eq!(ok.headers["x-backend-id"], "b1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_error_is_trailers_only_with_grpc_content_type() {
    let backend = Echo::start("b1").await;
    let routes = "routes:\n  - match: { prefix: \"/other.\" }\n    cluster: echo\n";
    let sluice = Sluice::start(&format!("{}{routes}", Sluice::cluster(&[backend.addr], ""))).await;
    let mut client = RawClient::connect(sluice.addr).await;
    let reply = client
        .call(
            "POST",
            "/echo.v1.Echo/Unary",
            &GRPC_HEADERS,
            grpc_frame(&request("x")),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/grpc");
    assert!(
        reply.body.is_empty() && reply.trailers.is_none(),
        "{reply:?}"
    );
    assert_eq!(reply.grpc_status().as_deref(), Some("12"));
    assert_eq!(
        reply.headers["grpc-message"],
        "sluice: no route for /echo.v1.Echo/Unary"
    );
}

fn check(config: &str) -> (bool, String) {
    check_with_env(config, &[])
}

const VALID: &str = "listeners:
  - name: grpc
    address: \"127.0.0.1:50051\"
clusters:
  - name: echo
    discovery:
      static: [\"127.0.0.1:50071\"]
";

#[test]
fn check_accepts_the_shipped_configs() {
    let mut checked = 0;
    for entry in std::fs::read_dir("config").unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_some_and(|e| e == "yaml") {
            let (ok, output) = check(&std::fs::read_to_string(&file).unwrap());
            assert!(ok, "{}: {output}", file.display());
            assert!(output.contains("valid"), "{output}");
            checked += 1;
        }
    }
    assert!(checked >= 1);
    assert!(check(VALID).0);
}

#[test]
fn check_rejects_invalid_configs_with_path_and_line() {
    let cases: &[(&str, &[&str])] = &[
        (
            "listeners: []\nclusters: []\n",
            &["listeners: must not be empty", "line 1 column 12"],
        ),
        (
            &VALID.replace("127.0.0.1:50051", "localhost"),
            &[
                "listeners[0].address",
                "invalid listen address \"localhost\"",
                "line 3",
            ],
        ),
        (
            &VALID.replace("127.0.0.1:50071", "10.0.0.7"),
            &[
                "clusters[0].discovery.static[0]",
                "expected HOST:PORT",
                "line 7",
            ],
        ),
        (
            &format!("{VALID}    balancer: fastest\n"),
            &[
                "clusters[0].balancer",
                "unknown variant `fastest`",
                "line 8",
            ],
        ),
        (
            &VALID.replace("static: [", "static: [\"127.0.0.1:9\", \"127.0.0.1:9\", "),
            &[
                "clusters[0].discovery.static[1]: \"127.0.0.1:9\" is listed twice",
                "line 7",
            ],
        ),
        (
            &format!("{VALID}    max_deadline: 5\n"),
            &[
                "clusters[0].max_deadline",
                "invalid duration \"5\"",
                "line 8",
            ],
        ),
        (
            &format!("{VALID}    retry: {{ max_attempts: 0 }}\n"),
            &["clusters[0].retry.max_attempts: must be at least 1"],
        ),
        (
            &format!("{VALID}    tls: {{ ca_file: ca.pem }}\n"),
            &["clusters[0].tls.ca_file: cannot read \"ca.pem\"", "line 8"],
        ),
        (
            &VALID.replace(
                "    address: \"127.0.0.1:50051\"\n",
                "    address: \"127.0.0.1:50051\"\n    max_header_list_size: 0\n",
            ),
            &[
                "listeners[0].max_header_list_size",
                "must be at least 1",
                "line 4",
            ],
        ),
        (
            &format!("{VALID}    max_concurrent_streams_per_backend: 0\n"),
            &[
                "clusters[0].max_concurrent_streams_per_backend",
                "must be at least 1",
                "line 8",
            ],
        ),
        (
            &format!("{VALID}    queue_timeout: 0s\n"),
            &[
                "clusters[0].queue_timeout",
                "must be greater than 0",
                "line 8",
            ],
        ),
        (
            &format!("{VALID}etcd:\n  endpoints: [\"127.0.0.1:2379\"]\n"),
            &[
                "etcd.endpoints[0]",
                "invalid etcd endpoint \"127.0.0.1:2379\"",
                "line 9",
            ],
        ),
        (
            &VALID.replace("    discovery:", "    discovery:\n      consul: x"),
            &[
                "clusters[0].discovery",
                "unknown variant `consul`",
                "line 7",
            ],
        ),
        (
            &format!("{VALID}  - name: echo\n    discovery: {{ static: [\"a:1\"] }}\n"),
            &["clusters[1].name: duplicate cluster name \"echo\""],
        ),
        (
            &format!("{VALID}routes:\n  - cluster: nosuch\n"),
            &[
                "routes[0].cluster: no cluster is named \"nosuch\"",
                "line 9",
            ],
        ),
        ("listeners: [", &["sluice.yaml"]),
    ];
    for (config, expected) in cases {
        let (ok, output) = check(config);
        assert!(!ok, "accepted:\n{config}");
        for needle in *expected {
            assert!(
                output.contains(needle),
                "expected {needle:?} in {output:?}\nfor:\n{config}"
            );
        }
    }
}

#[test]
fn run_with_an_invalid_config_exits_1_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "listeners: 7\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listeners: invalid type"), "{stderr}");
}

/// Runs `sluice run ARGS --config FILE` on `config`; returns its exit code and stderr.
fn run_with(config: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[test]
fn run_on_a_busy_port_exits_1_naming_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let (code, stderr) = run_with(&VALID.replace("127.0.0.1:50051", &addr.to_string()), &[]);
    assert_eq!(code, Some(1));
    let want = format!("listener \"grpc\": cannot listen on {addr}");
    assert!(stderr.contains(&want), "{stderr}");
}

#[test]
fn an_upgrade_refuses_port_zero_naming_the_listener() {
    let config = VALID.replace("127.0.0.1:50051", "127.0.0.1:0");
    let (code, stderr) = run_with(&config, &["--upgrade"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("grpc: port 0 cannot be upgraded"),
        "{stderr}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `sluice check` with `vars` in its environment.
fn check_with_env(config: &str, vars: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("SLUICE_TEST_UNSET")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn environment_variables_in_values_are_expanded_and_shown_by_check() {
    let config = "listeners:
  - name: grpc
    address: ${SLUICE_TEST_ADDR}
    max_connections: ${SLUICE_TEST_MAX}
admin:
  address: \"${SLUICE_TEST_UNSET:-127.0.0.1:9901}\"
clusters:
  - name: echo
    discovery:
      static: [\"${SLUICE_TEST_BACKEND}\"]
";
    let vars = [
        ("SLUICE_TEST_ADDR", "0.0.0.0:50051"),
        ("SLUICE_TEST_MAX", "500"),
        ("SLUICE_TEST_BACKEND", "10.0.0.7:50051"),
    ];
    let (ok, output) = check_with_env(config, &vars);
    assert!(ok, "{output}");
    assert!(
        output.contains(":3:14: ${SLUICE_TEST_ADDR} = 0.0.0.0:50051"),
        "{output}"
    );
    assert!(output.contains("${SLUICE_TEST_MAX} = 500"), "{output}");
    assert!(
        output.contains("${SLUICE_TEST_UNSET:-127.0.0.1:9901} = 127.0.0.1:9901"),
        "{output}"
    );
    assert!(
        output.contains("${SLUICE_TEST_BACKEND} = 10.0.0.7:50051"),
        "{output}"
    );

    // A variable that is not set and has no default is an error naming it and where.
    let (ok, output) = check_with_env(config, &vars[1..]);
    assert!(!ok, "{output}");
    assert!(
        output.contains("environment variable SLUICE_TEST_ADDR is not set")
            && output.contains("at line 3 column 14"),
        "{output}"
    );
    // A value that is not what its key takes is reported as usual, at the expanded value.
    let bad = [("SLUICE_TEST_MAX", "many"), vars[0], vars[2]];
    let (ok, output) = check_with_env(config, &bad);
    assert!(!ok, "{output}");
    assert!(output.contains("max_connections"), "{output}");
}
