use std::time::Duration;

use super::*;

fn err(yaml: &str) -> String {
    Config::parse(yaml, "t.yaml").unwrap_err().to_string()
}

const MINIMAL: &str = "
listeners:
  - name: grpc
    address: 127.0.0.1:50051
clusters:
  - name: echo
    discovery:
      static: [\"127.0.0.1:50071\"]
";

#[test]
fn minimal_config_gets_defaults() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    let cluster = &config.clusters[0];
    assert_eq!(cluster.balancer, BalancerKind::P2cEwma);
    assert_eq!(cluster.max_deadline.0, Duration::from_secs(60));
    assert_eq!(cluster.retry.max_attempts.0, 2);
    assert_eq!(config.shutdown.drain_timeout.0, Duration::from_secs(30));
    assert!(config.request_id.generate);
}

#[test]
fn unknown_key_names_path_and_line() {
    let e = err(&MINIMAL.replace("    discovery:", "    colour: red\n    discovery:"));
    assert!(e.contains("clusters[0]"), "{e}");
    assert!(e.contains("unknown field `colour`"), "{e}");
    assert!(e.ends_with("at line 7 column 5"), "{e}");
    // In a flow mapping, the key's own column.
    let e = err(&format!(
        "{MINIMAL}    retry: {{ max_attempts: 2, colour: red }}\n"
    ));
    assert!(e.contains("clusters[0].retry.colour: unknown field"), "{e}");
    assert!(e.ends_with("at line 9 column 31"), "{e}");
}

#[test]
fn listener_limits_have_defaults_and_refuse_zero() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    let listener = &config.listeners[0];
    assert_eq!(listener.max_connections, None);
    assert_eq!(listener.max_concurrent_streams.0, 10_000);
    assert_eq!(listener.max_header_list_size.0, 65_536);
    let e = err(&MINIMAL.replace(
        "    address: 127.0.0.1:50051\n",
        "    address: 127.0.0.1:50051\n    max_connections: 0\n",
    ));
    assert!(
        e.contains("listeners[0].max_connections: must be at least 1"),
        "{e}"
    );
}

#[test]
fn route_to_missing_cluster_is_an_error() {
    let e = err(&format!("{MINIMAL}routes:\n  - cluster: nosuch\n"));
    assert!(
        e.contains("routes[0].cluster: no cluster is named \"nosuch\""),
        "{e}"
    );
    assert!(e.contains("line 10 column 14"), "{e}");
}

/// Two clusters that share every key: an error in the second must point at the second's own
/// line, not at the first line holding the same key.
const TWO_CLUSTERS: &str = "listeners:
  - name: grpc
    address: 127.0.0.1:50051
clusters:
  - name: one
    discovery: { static: [\"127.0.0.1:50071\"] }
    retry: { max_attempts: 2 }
    balancer: round_robin
  - name: two
    discovery: { static: [\"127.0.0.1:50072\"] }
    retry: { max_attempts: 2 }
    balancer: round_robin
routes:
  - cluster: one
";

#[test]
fn a_type_error_in_the_second_cluster_names_its_own_line() {
    assert!(Config::parse(TWO_CLUSTERS, "t.yaml").is_ok());
    let yaml = TWO_CLUSTERS.replace(
        "    balancer: round_robin\nroutes:",
        "    balancer: [fastest]\nroutes:",
    );
    let e = err(&yaml);
    assert!(e.starts_with("t.yaml: clusters[1].balancer: "), "{e}");
    assert!(e.contains("at line 12 column"), "{e}");
}

#[test]
fn a_validation_error_in_the_second_cluster_names_its_own_line() {
    let yaml = TWO_CLUSTERS.replace(
        "    retry: { max_attempts: 2 }\n    balancer: round_robin\nroutes:",
        "    retry: { max_attempts: 0 }\n    balancer: round_robin\nroutes:",
    );
    let e = err(&yaml);
    assert!(
        e.starts_with("t.yaml: clusters[1].retry.max_attempts: must be at least 1"),
        "{e}"
    );
    assert!(e.ends_with("at line 11 column 28"), "{e}");
    // A check across fields points at the second cluster's value too.
    let e = err(&TWO_CLUSTERS.replace("name: two", "name: one"));
    assert!(
        e.contains("clusters[1].name: duplicate cluster name \"one\" at line 9 column 11"),
        "{e}"
    );
    let e = err(&TWO_CLUSTERS.replace("50072", "50071\", \"127.0.0.1:50071"));
    assert!(
        e.contains(
            "clusters[1].discovery.static[1]: \"127.0.0.1:50071\" is listed twice at line 10"
        ),
        "{e}"
    );
}

#[test]
fn one_of_choices_are_enums() {
    let e = err(&MINIMAL.replace(
        "static: [\"127.0.0.1:50071\"]",
        "static: [\"127.0.0.1:50071\"]\n      etcd: { prefix: x }",
    ));
    assert!(e.contains("clusters[0].discovery"), "{e}");
    let e = err(&format!(
        "{MINIMAL}routes:\n  - match: {{ service: a.B, prefix: /a. }}\n    cluster: echo\n"
    ));
    assert!(e.contains("routes[0].match"), "{e}");
    let e = err(&format!(
        "{MINIMAL}routes:\n  - match: {{ prefix: a. }}\n    cluster: echo\n"
    ));
    assert!(e.contains("routes[0].match.prefix"), "{e}");
    assert!(e.contains("must start with '/'"), "{e}");
}

const ETCD: &str = "
listeners:
  - name: grpc
    address: 127.0.0.1:50051
etcd:
  endpoints: [\"http://127.0.0.1:2379\"]
clusters:
  - name: echo
    discovery:
      etcd: { prefix: \"services/echo/\", format: etcd-naming }
";

#[test]
fn etcd_discovery_parses_with_defaults() {
    let config = Config::parse(ETCD, "t.yaml").unwrap();
    let DiscoveryConfig::Etcd(etcd) = &config.clusters[0].discovery.value else {
        panic!("etcd discovery");
    };
    assert_eq!(etcd.prefix.0, "services/echo");
    assert_eq!(etcd.format, EtcdFormat::EtcdNaming);
    let client = config.etcd.unwrap();
    assert_eq!(client.dial_timeout.0, Duration::from_secs(5));
    let auto = ETCD.replace(", format: etcd-naming", "");
    let config = Config::parse(&auto, "t.yaml").unwrap();
    let DiscoveryConfig::Etcd(etcd) = &config.clusters[0].discovery.value else {
        panic!("etcd discovery");
    };
    assert_eq!(etcd.format, EtcdFormat::Auto);
}

fn load_err(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    std::fs::write(&path, yaml).unwrap();
    Config::load(&path).unwrap_err().to_string()
}

#[test]
fn etcd_config_errors_name_the_key() {
    let cases = [
        (
            ETCD.replace("etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\n", ""),
            "clusters[0].discovery: cluster \"echo\" uses etcd discovery, so the top-level `etcd:` block is required",
        ),
        (
            ETCD.replace("http://127.0.0.1:2379", "127.0.0.1:2379"),
            "etcd.endpoints[0]: invalid etcd endpoint \"127.0.0.1:2379\"",
        ),
        (
            ETCD.replace("http://", "https://"),
            "etcd.endpoints[0]: \"https://127.0.0.1:2379\" is https, so `etcd.tls`",
        ),
        (
            ETCD.replace("etcd-naming", "consul"),
            "clusters[0].discovery.etcd.format: unknown variant `consul`",
        ),
        (
            ETCD.replace("\"services/echo/\"", "\"/\""),
            "clusters[0].discovery.etcd.prefix: invalid etcd prefix",
        ),
        (
            ETCD.replace("  endpoints:", "  username: root\n  endpoints:"),
            "etcd: `username` and `password` go together",
        ),
        (
            ETCD.replace("  endpoints:", "  dial_timeout: 0s\n  endpoints:"),
            "etcd.dial_timeout: must be greater than 0",
        ),
        (
            ETCD.replace("http://", "https://").replace(
                "  endpoints:",
                "  tls: { ca_file: /nonexistent/ca.pem }\n  endpoints:",
            ),
            "etcd.tls.ca_file: cannot read \"/nonexistent/ca.pem\"",
        ),
    ];
    for (yaml, want) in cases {
        let e = load_err(&yaml);
        assert!(e.contains(want), "want {want:?} in: {e}");
        assert!(e.contains(" at line "), "{e}");
        assert!(e.contains(" column "), "{e}");
    }
}

#[test]
fn etcd_tls_files_are_read_after_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ca.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let yaml = ETCD.replace("http://", "https://").replace(
        "  endpoints:",
        &format!("  tls: {{ ca_file: \"{}\" }}\n  endpoints:", bad.display()),
    );
    // Parsing alone reads nothing.
    assert!(Config::parse(&yaml, "t.yaml").is_ok());
    let e = load_err(&yaml);
    assert!(e.contains("etcd.tls.ca_file: "), "{e}");
    assert!(e.contains("not a usable trust anchor"), "{e}");
    assert!(e.contains("at line 6 column"), "{e}");
}

#[test]
fn booleans_are_true_or_false_only() {
    let e = err(&format!("{MINIMAL}request_id: {{ generate: off }}\n"));
    assert!(e.contains("request_id.generate"), "{e}");
    assert!(e.contains("at line 9"), "{e}");
}

#[test]
fn outlier_detection_is_on_by_default_and_checked() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    let OutlierDetection::On(settings) = config.clusters[0].outlier_detection else {
        panic!("on by default");
    };
    assert_eq!(settings.consecutive_failures.0, 5);
    assert_eq!(settings.base_ejection_time.0, Duration::from_secs(10));
    assert_eq!(settings.max_ejection_percent.0, 50);
    let off = Config::parse(&format!("{MINIMAL}    outlier_detection: off\n"), "t").unwrap();
    assert_eq!(off.clusters[0].outlier_detection, OutlierDetection::Off);
    let cases = [
        (
            "{ consecutive_failures: 0 }",
            "consecutive_failures: must be at least 1",
        ),
        (
            "{ max_ejection_percent: 101 }",
            "max_ejection_percent: must be between 0 and 100",
        ),
        (
            "{ base_ejection_time: 0s }",
            "base_ejection_time: must be greater than 0",
        ),
        ("{ colour: red }", "unknown field `colour`"),
        ("sometimes", "expected `off`"),
    ];
    for (value, want) in cases {
        let e = err(&format!("{MINIMAL}    outlier_detection: {value}\n"));
        assert!(e.contains("clusters[0].outlier_detection"), "{e}");
        assert!(e.contains(want), "want {want:?} in {e}");
        assert!(e.contains("at line 9"), "{e}");
    }
}

#[test]
fn retry_on_names_statuses() {
    let yaml = format!("{MINIMAL}    retry: {{ retry_on: [unavailable, internal] }}\n");
    let config = Config::parse(&yaml, "t.yaml").unwrap();
    assert_eq!(
        config.clusters[0].retry.retry_on,
        vec![RetryOn::Unavailable, RetryOn::Internal]
    );
    let e = err(&format!(
        "{MINIMAL}    retry: {{ retry_on: [not_found] }}\n"
    ));
    assert!(
        e.contains("clusters[0].retry.retry_on[0]: unknown variant `not_found`"),
        "{e}"
    );
    assert!(e.contains("at line 9"), "{e}");
}

#[test]
fn health_check_is_off_unless_present_and_checked() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    assert!(config.clusters[0].health_check.is_none());
    let on = Config::parse(&format!("{MINIMAL}    health_check: {{}}\n"), "t").unwrap();
    let check = on.clusters[0].health_check.clone().unwrap();
    assert_eq!(check.interval.0, Duration::from_secs(5));
    assert_eq!(check.timeout.0, Duration::from_secs(1));
    assert_eq!(
        (check.unhealthy_threshold.0, check.healthy_threshold.0),
        (2, 1)
    );
    let e = err(&format!(
        "{MINIMAL}    health_check: {{ unhealthy_threshold: 0 }}\n"
    ));
    assert!(
        e.contains("clusters[0].health_check.unhealthy_threshold: must be at least 1"),
        "{e}"
    );
    assert!(e.contains("at line 9"), "{e}");
}

/// MINIMAL with `tls` lines (indented for the listener) added to its listener.
fn with_listener_tls(tls: &str) -> String {
    MINIMAL.replace(
        "    address: 127.0.0.1:50051\n",
        &format!("    address: 127.0.0.1:50051\n    tls:\n{tls}"),
    )
}

#[test]
fn listener_tls_needs_exactly_one_way_to_name_its_certificates() {
    let e = err(&with_listener_tls("      cert_file: a.pem\n"));
    assert!(
        e.contains("listeners[0].tls: `cert_file` and `key_file` go together"),
        "{e}"
    );
    assert!(e.ends_with("at line 6 column 18"), "{e}");
    let both = "      cert_file: a.pem\n      key_file: a.key\n      certificates: [{cert_file: b.pem, key_file: b.key}]\n";
    let e = err(&with_listener_tls(both));
    assert!(e.contains("not both"), "{e}");
    let e = err(&with_listener_tls("      client_ca_file: ca.pem\n"));
    assert!(e.contains("needs a certificate"), "{e}");
    let forward = "      cert_file: a.pem\n      key_file: a.key\n      forward_client_cert: { header: x-client }\n";
    let e = err(&with_listener_tls(forward));
    assert!(e.contains("listeners[0].tls.forward_client_cert"), "{e}");
    assert!(e.contains("needs `client_ca_file`"), "{e}");
    let header = "      cert_file: a.pem\n      key_file: a.key\n      client_ca_file: ca.pem\n      forward_client_cert: { header: X-Client }\n";
    let e = err(&with_listener_tls(header));
    assert!(
        e.contains("listeners[0].tls.forward_client_cert.header"),
        "{e}"
    );
    assert!(e.contains("lowercase"), "{e}");
    let e = err(&with_listener_tls(
        "      cert_file: a.pem\n      key_file: a.key\n      sni: yes\n",
    ));
    assert!(e.contains("unknown field `sni`"), "{e}");
}

#[test]
fn listener_tls_files_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let one = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let two = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
    let cert = write("a.pem", &one.cert.pem());
    let key = write("a.key", &one.signing_key.serialize_pem());
    let other_key = write("b.key", &two.signing_key.serialize_pem());
    let pair =
        |cert: &str, key: &str| format!("      cert_file: \"{cert}\"\n      key_file: \"{key}\"\n");
    let good = with_listener_tls(&pair(&cert, &key));
    let loaded = Config::parse(&good, "t.yaml").map(|mut c| {
        c.files = Files::read(&c).map_err(|p| p.in_file("t.yaml")).unwrap();
        c
    });
    let files = loaded.unwrap().files.listener_tls;
    assert_eq!(files[0].as_ref().unwrap().certificates.len(), 1);

    let e = load_err(&with_listener_tls(&pair(&cert, &other_key)));
    assert!(e.contains("listeners[0].tls: "), "{e}");
    assert!(e.contains("does not belong to the certificate"), "{e}");
    assert!(e.contains("at line 6"), "{e}");
    let e = load_err(&with_listener_tls(&pair("/nonexistent/a.pem", &key)));
    assert!(
        e.contains("listeners[0].tls.cert_file: cannot read \"/nonexistent/a.pem\""),
        "{e}"
    );
    let list = format!("      certificates:\n        - {{ cert_file: \"{cert}\", key_file: \"{key}\" }}\n        - {{ cert_file: \"{cert}\", key_file: \"{other_key}\" }}\n");
    let e = load_err(&with_listener_tls(&list));
    assert!(e.contains("listeners[0].tls.certificates[1]"), "{e}");
    let ca = format!("{}      client_ca_file: \"{key}\"\n", pair(&cert, &key));
    let e = load_err(&with_listener_tls(&ca));
    assert!(e.contains("listeners[0].tls.client_ca_file"), "{e}");
}

#[test]
fn cluster_tls_keys_are_checked() {
    let e = err(&format!("{MINIMAL}    tls: {{ cert_file: c.pem }}\n"));
    assert!(
        e.contains("clusters[0].tls: `cert_file` and `key_file` go together"),
        "{e}"
    );
    let e = err(&format!(
        "{MINIMAL}    tls: {{ server_name: \"not a name\" }}\n"
    ));
    assert!(e.contains("clusters[0].tls.server_name"), "{e}");
    assert!(e.contains("not a DNS name or IP address"), "{e}");
    let e = load_err(&format!(
        "{MINIMAL}    tls: {{ ca_file: /nonexistent/ca.pem }}\n"
    ));
    assert!(
        e.contains("clusters[0].tls.ca_file: cannot read \"/nonexistent/ca.pem\""),
        "{e}"
    );
    assert!(Config::parse(&format!("{MINIMAL}    tls: {{}}\n"), "t.yaml").is_ok());
}

#[test]
fn listener_connection_policy_has_grpc_go_defaults_and_checked_values() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    let listener = &config.listeners[0];
    assert_eq!(listener.max_connection_age, None);
    assert_eq!(
        listener.keepalive.min_ping_interval.0,
        Duration::from_secs(300)
    );
    assert!(!listener.keepalive.permit_without_stream);
    assert_eq!(listener.keepalive.idle_timeout.0, Duration::from_secs(3600));
    assert_eq!(
        listener.keepalive.ping_interval.0,
        Duration::from_secs(7200)
    );
    assert_eq!(listener.keepalive.ping_timeout.0, Duration::from_secs(20));
    let with = |keys: &str| {
        MINIMAL.replace(
            "    address: 127.0.0.1:50051\n",
            &format!("    address: 127.0.0.1:50051\n{keys}"),
        )
    };
    let e = err(&with("    max_connection_age_grace: 1m\n"));
    assert!(
        e.contains("`max_connection_age_grace` needs `max_connection_age`"),
        "{e}"
    );
    let e = err(&with("    max_connection_age: 0s\n"));
    assert!(e.contains("listeners[0].max_connection_age"), "{e}");
    let e = err(&with("    keepalive: { ping_timeout: soon }\n"));
    assert!(e.contains("listeners[0].keepalive.ping_timeout"), "{e}");
    assert!(e.contains("at line 5"), "{e}");
    let e = err(&with("    keepalive: { permit_without_stream: yes }\n"));
    assert!(
        e.contains("listeners[0].keepalive.permit_without_stream"),
        "{e}"
    );
    let parsed = Config::parse(&with("    max_connection_age: 30m\n    max_connection_age_grace: 1m\n    keepalive: { idle_timeout: 10m }\n"), "t.yaml").unwrap();
    assert_eq!(
        parsed.listeners[0].max_connection_age.map(|d| d.0),
        Some(Duration::from_secs(1800))
    );
    assert_eq!(
        parsed.listeners[0].keepalive.idle_timeout.0,
        Duration::from_secs(600)
    );
}

#[test]
fn adaptive_concurrency_is_on_by_default_and_checked() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    let AdaptiveConcurrency::On(settings) = config.clusters[0].adaptive_concurrency else {
        panic!("on by default");
    };
    assert_eq!(
        (
            settings.min_limit.0,
            settings.initial_limit.0,
            settings.tolerance.0
        ),
        (3, 20, 2.0)
    );
    let off = format!("{MINIMAL}    adaptive_concurrency: off\n");
    let off = Config::parse(&off, "t").unwrap();
    assert_eq!(
        off.clusters[0].adaptive_concurrency,
        AdaptiveConcurrency::Off
    );
    let set = format!("{MINIMAL}    adaptive_concurrency: {{ min_limit: 5, tolerance: 1.5 }}\n");
    let set = Config::parse(&set, "t").unwrap();
    let AdaptiveConcurrency::On(settings) = set.clusters[0].adaptive_concurrency else {
        panic!("on");
    };
    assert_eq!((settings.min_limit.0, settings.tolerance.0), (5, 1.5));
    let cases = [
        ("{ min_limit: 0 }", "min_limit: must be at least 1"),
        (
            "{ tolerance: 1.0 }",
            "tolerance: must be a factor greater than 1",
        ),
        (
            "{ tolerance: 0.5 }",
            "tolerance: must be a factor greater than 1",
        ),
        ("{ colour: red }", "unknown field `colour`"),
        (
            "sometimes",
            "expected `off`, or { min_limit, initial_limit, tolerance }",
        ),
        (
            "{ min_limit: 50, initial_limit: 10 }",
            "`min_limit` (50) is above `initial_limit` (10)",
        ),
    ];
    for (value, want) in cases {
        let e = err(&format!("{MINIMAL}    adaptive_concurrency: {value}\n"));
        assert!(e.contains("clusters[0].adaptive_concurrency"), "{e}");
        assert!(e.contains(want), "want {want:?} in {e}");
    }
}

#[test]
fn client_key_names_ip_header_or_identity() {
    let config = Config::parse(MINIMAL, "t.yaml").unwrap();
    assert_eq!(config.client_key, ClientKeyConfig::PeerIp);
    let with = |value: &str| Config::parse(&format!("{MINIMAL}client_key: {value}\n"), "t");
    assert_eq!(
        with("tls_identity").unwrap().client_key,
        ClientKeyConfig::TlsIdentity
    );
    let header = with("{ header: x-tenant }").unwrap().client_key;
    assert_eq!(
        header,
        ClientKeyConfig::Header(RequestHeader(http::HeaderName::from_static("x-tenant")))
    );
    for (value, want) in [
        ("{ header: X-Tenant }", "use a lowercase header name"),
        ("{ header: \":path\" }", "not a pseudo-header"),
        ("{ header: \"bad header\" }", "is not a valid header name"),
        ("source_port", "unknown variant `source_port`"),
    ] {
        let e = with(value).unwrap_err().to_string();
        assert!(e.contains("client_key"), "{e}");
        assert!(e.contains(want), "want {want:?} in {e}");
        assert!(e.contains("line 9"), "{e}");
    }
}

#[test]
fn steering_mistakes_are_named_with_their_place() {
    let two =
        format!("{MINIMAL}  - name: canary\n    discovery:\n      static: [\"127.0.0.1:50072\"]\n");
    let cases = [
        (
            "routes:\n  - cluster: echo\n    split: [{ cluster: canary, weight: 1 }]\n",
            "routes[0]: give `cluster` or `split`, not both at line",
        ),
        ("routes:\n  - name: r\n", "routes[0]: needs `cluster: NAME` or `split"),
        (
            "routes:\n  - split: [{ cluster: echo, weight: 0 }, { cluster: canary, weight: 0 }]\n",
            "routes[0].split: a split needs at least one cluster with a weight above 0",
        ),
        (
            "routes:\n  - split: [{ cluster: echo, weight: 1 }, { cluster: echo, weight: 2 }]\n",
            "routes[0].split[1]: cluster \"echo\" is in the split twice",
        ),
        (
            "routes:\n  - split: [{ cluster: nosuch, weight: 1 }]\n",
            "routes[0].split: no cluster is named \"nosuch\"",
        ),
        (
            "routes:\n  - split: [{ cluster: echo, weight: 10001 }]\n",
            "weight 10001 is above 10000",
        ),
        (
            "routes:\n  - cluster: echo\n    hash_on: { header: x-user }\n",
            "routes[0].hash_on: `hash_on` makes a split sticky",
        ),
        (
            "routes:\n  - match: { headers: [{ name: x-t, exact: a, prefix: b }] }\n    cluster: echo\n",
            "routes[0].match.headers[0]: give exactly one of `exact`, `prefix` or `present`",
        ),
        (
            "routes:\n  - match: { headers: [{ name: x-id-bin, present: true }] }\n    cluster: echo\n",
            "is binary metadata",
        ),
        (
            "routes:\n  - name: a\n    cluster: echo\n  - name: a\n    cluster: canary\n",
            "routes[1].name: duplicate route name \"a\"",
        ),
        (
            "routes:\n  - cluster: echo\n    rate_limit: { rate: 10/h }\n",
            "invalid rate \"10/h\"",
        ),
        (
            "routes:\n  - cluster: echo\n    rate_limit: { rate: 10/s, fleet_wide: true }\n",
            "`fleet_wide` divides the rate by the live instances",
        ),
        (
            "overrides: { etcd_prefix: sluice/overrides }\nroutes:\n  - cluster: echo\n",
            "overrides: `overrides` lives in etcd",
        ),
    ];
    for (rest, expected) in cases {
        let e = err(&format!("{two}{rest}"));
        assert!(e.contains(expected), "{rest}\n=> {e}");
    }
}

#[test]
fn a_full_steering_route_parses() {
    let config = Config::parse(
        &format!(
            "{MINIMAL}  - name: canary\n    discovery:\n      static: [\"127.0.0.1:50072\"]\n\
             etcd: {{ endpoints: [\"http://127.0.0.1:2379\"] }}\n\
             overrides: {{ etcd_prefix: sluice/overrides/ }}\n\
             fleet: {{ etcd_prefix: sluice/fleet }}\n\
             routes:\n  - name: echo\n    match: {{ service: echo.v1.Echo, headers: [{{ name: x-tenant, prefix: a }}] }}\n\
             \x20   split: [{{ cluster: echo, weight: 95 }}, {{ cluster: canary, weight: 5 }}]\n\
             \x20   hash_on: {{ header: x-user }}\n    cluster_header: x-sluice-cluster\n\
             \x20   rate_limit: {{ rate: 600/m, burst: 20, per: client_method, fleet_wide: true }}\n"
        ),
        "t.yaml",
    )
    .unwrap();
    let route = &config.routes.as_ref().unwrap()[0];
    assert_eq!(route.clusters().len(), 2);
    let limit = route.rate_limit.as_ref().unwrap();
    assert_eq!(
        (limit.rate.value.0, limit.per),
        (10.0, RateKey::ClientMethod)
    );
    assert_eq!(config.overrides.unwrap().etcd_prefix.0, "sluice/overrides");
}

#[test]
fn an_unreadable_or_empty_token_file_is_named_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    let token = dir.path().join("token");
    let yaml = format!(
        "{MINIMAL}admin:\n  address: 127.0.0.1:9901\n  token_file: {}\n",
        token.display()
    );
    std::fs::write(&config, &yaml).unwrap();
    let e = Config::load(&config).unwrap_err().to_string();
    assert!(e.contains("admin.token_file: cannot read"), "{e}");
    std::fs::write(&token, "\n").unwrap();
    let e = Config::load(&config).unwrap_err().to_string();
    assert!(e.contains("is empty"), "{e}");
    std::fs::write(&token, "s3cret\n").unwrap();
    assert!(Config::load(&config).is_ok());
}

#[test]
fn tracing_and_hedging_parse_with_defaults_and_refuse_what_cannot_work() {
    let tracing = "tracing:\n  otlp: { endpoint: \"http://127.0.0.1:4317\" }\n";
    let routes = "routes:\n  - cluster: echo\n    hedging: { delay: 30ms }\n";
    let config = Config::parse(&format!("{MINIMAL}{tracing}{routes}"), "t.yaml").unwrap();
    let tracing_config = &config.tracing.as_ref().unwrap().value;
    assert_eq!(tracing_config.otlp.protocol, OtlpProtocol::Grpc);
    assert_eq!(tracing_config.sampling.ratio.0, 0.1);
    assert_eq!(tracing_config.service_name, "sluice");
    let hedging = config.routes.as_ref().unwrap()[0].hedging.unwrap();
    assert_eq!(hedging.delay, HedgeDelay::Fixed(Duration::from_millis(30)));
    assert_eq!(hedging.max_attempts.0, 2);
    assert_eq!(hedging.budget_ratio.0, 0.02);
    let https_over_http = "tracing:\n  otlp: { endpoint: \"https://otel:4318\", protocol: http }\n";
    let e = err(&format!("{MINIMAL}{https_over_http}"));
    assert!(
        e.contains("tracing.otlp: `protocol: http` exports over plain HTTP only"),
        "{e}"
    );
    let no_queue = "tracing:\n  otlp: { endpoint: \"http://otel:4317\", max_queue: 0 }\n";
    let e = err(&format!("{MINIMAL}{no_queue}"));
    assert!(e.contains("`max_queue` must be at least 1"), "{e}");
    let one_attempt = "routes:\n  - cluster: echo\n    hedging: { max_attempts: 1 }\n";
    let e = err(&format!("{MINIMAL}{one_attempt}"));
    assert!(
        e.contains("routes[0].hedging.max_attempts: must be between 2 and 5"),
        "{e}"
    );
}
