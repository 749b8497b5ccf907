//! TLS on the client leg: all four call types through a TLS listener, certificates chosen by
//! SNI, mTLS (refused without a certificate; the identity forwarded and logged), ALPN `h2`
//! only, and certificates rotated on disk or by SIGHUP without a restart. Certificates are
//! made by the tests (support/pki.rs).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::demo::pb::echo_client::EchoClient;
use support::pki::{Issued, TestCa};
use support::{request, Echo, Sluice};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A TLS client on one connection to `sluice`, checking the server's certificate against
/// `ca` for `name` (sent as SNI), with a client certificate when given.
async fn tls_client(
    sluice: &Sluice,
    ca: &TestCa,
    name: &str,
    identity: Option<&Issued>,
) -> Result<EchoClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert_pem))
        .domain_name(name);
    if let Some(issued) = identity {
        tls = tls.identity(Identity::from_pem(&issued.cert_pem, &issued.key_pem));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", sluice.addr))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(EchoClient::new(channel))
}

/// Whether a new TLS connection for `name` makes a call.
async fn serves(sluice: &Sluice, ca: &TestCa, name: &str) -> bool {
    match tls_client(sluice, ca, name, None).await {
        Ok(mut client) => client.unary(request("hi")).await.is_ok(),
        Err(_) => false,
    }
}

fn tls_block(files: &[(&Path, &Path)], extra: &str) -> String {
    let mut block = String::from("    tls:\n");
    if let [(cert, key)] = files {
        block += &format!(
            "      cert_file: \"{}\"\n      key_file: \"{}\"\n",
            cert.display(),
            key.display()
        );
    } else {
        block += "      certificates:\n";
        for (cert, key) in files {
            block += &format!(
                "        - {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
                cert.display(),
                key.display()
            );
        }
    }
    block + extra
}

fn metric(metrics: &str, name: &str, labels: &str) -> f64 {
    (metrics.lines())
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A cluster over `backend` that speaks TLS to it, checking its certificate for `name`.
fn tls_cluster(backend: &Echo, ca_file: &Path, name: &str, extra: &str) -> String {
    let tls = format!(
        "    tls: {{ ca_file: \"{}\", server_name: {name} }}\n{extra}",
        ca_file.display()
    );
    Sluice::cluster(&[backend.addr], &tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_types_pass_through_tls_on_both_legs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let server = ca.server(dir.path(), "server", &["localhost"]);
    let backend_cert = ca.server(dir.path(), "backend", &["backend.test"]);
    let ca_file = ca.write(dir.path(), "ca.pem");
    let backend = Echo::start_tls("b1", &backend_cert.cert_pem, &backend_cert.key_pem).await;
    let listener = tls_block(&[(&server.cert_file, &server.key_file)], "");
    // Health checks too go over TLS: a backend failing them would get no call.
    let checks = "    health_check: { interval: 200ms }\n";
    let cluster = tls_cluster(&backend, &ca_file, "backend.test", checks);
    let sluice = Sluice::start_with_listener(&listener, &cluster).await;
    let mut client = tls_client(&sluice, &ca, "localhost", None).await.unwrap();

    let unary = client.unary(request("unary")).await.unwrap().into_inner();
    assert_eq!(
        (unary.message.as_str(), unary.backend_id.as_str()),
        ("unary", "b1")
    );
    let asks = tokio_stream::iter((0..3).map(|i| request(&format!("up {i}"))));
    let up = client.client_stream(asks).await.unwrap().into_inner();
    assert_eq!(up.message, "up 2");
    let mut ask = request("down");
    ask.repeat = 3;
    let down: Vec<_> = client
        .server_stream(ask)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(down.len(), 3);
    assert!(down
        .iter()
        .all(|m| m.as_ref().is_ok_and(|m| m.message == "down")));
    let asks = tokio_stream::iter((0..4).map(|i| request(&format!("both {i}"))));
    let both: Vec<_> = client
        .bidi(asks)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let both: Vec<String> = both.into_iter().map(|m| m.unwrap().message).collect();
    assert_eq!(both, ["both 0", "both 1", "both 2", "both 3"]);

    let metrics = sluice.metrics().await;
    let expiry = metric(
        &metrics,
        "sluice_tls_certificate_expiry_timestamp_seconds",
        &format!("name=\"{}\"", server.cert_file.display()),
    );
    assert!(expiry > 1.7e9, "{metrics}");
    let checked = support::wait_until(Duration::from_secs(5), || {
        // The four calls reached the TLS backend.
        backend.calls() >= 4
    })
    .await;
    assert!(checked);
    let mut serving = 0.0;
    for _ in 0..50 {
        let checks = sluice.metrics().await;
        serving = metric(&checks, "sluice_health_checks_total", "result=\"serving\"");
        if serving >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        serving >= 1.0,
        "no health check passed over TLS:\n{}",
        sluice.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_for_another_name_is_unavailable_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let backend_cert = ca.server(dir.path(), "backend", &["backend.test"]);
    let ca_file = ca.write(dir.path(), "ca.pem");
    let backend = Echo::start_tls("b1", &backend_cert.cert_pem, &backend_cert.key_pem).await;
    let sluice = Sluice::start(&tls_cluster(&backend, &ca_file, "wrong.test", "")).await;
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("TLS handshake with"),
        "{status:?}"
    );
    assert!(status.message().contains("wrong.test"), "{status:?}");
    assert_eq!(backend.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_the_first_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let first = ca.server(dir.path(), "first", &["localhost"]);
    let other = ca.server(dir.path(), "other", &["other.test", "*.wild.test"]);
    let backend = Echo::start("b1").await;
    let files = [
        (first.cert_file.as_path(), first.key_file.as_path()),
        (other.cert_file.as_path(), other.key_file.as_path()),
    ];
    let listener = tls_block(&files, "");
    let sluice =
        Sluice::start_with_listener(&listener, &Sluice::cluster(&[backend.addr], "")).await;
    assert!(serves(&sluice, &ca, "localhost").await);
    assert!(serves(&sluice, &ca, "other.test").await);
    assert!(serves(&sluice, &ca, "a.wild.test").await);
    // An unknown name gets the default certificate, which is not valid for it.
    assert!(!serves(&sluice, &ca, "nobody.test").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_a_client_without_a_certificate_and_forwards_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let server = ca.server(dir.path(), "server", &["localhost"]);
    let client_cert = ca.client(
        dir.path(),
        "client",
        "client-a",
        Some("spiffe://test/client-a"),
    );
    let stranger_ca = TestCa::new("another CA");
    let stranger = stranger_ca.client(dir.path(), "stranger", "stranger", None);
    let ca_file = ca.write(dir.path(), "ca.pem");
    let backend = Echo::start("b1").await;
    let extra = format!(
        "      client_ca_file: \"{}\"\n      forward_client_cert: {{ header: x-forwarded-client-cert }}\n",
        ca_file.display()
    );
    let listener = tls_block(&[(&server.cert_file, &server.key_file)], &extra);
    let log = dir.path().join("access.log");
    let rest = format!(
        "access_log:\n  path: \"{}\"\n{}",
        log.display(),
        Sluice::cluster(&[backend.addr], "")
    );
    let sluice = Sluice::start_with_listener(&listener, &rest).await;

    // Without a certificate, or with one the client CA did not sign: refused at the handshake.
    let without = tls_client(&sluice, &ca, "localhost", None).await;
    let refused = match without {
        Err(_) => true,
        Ok(mut client) => client.unary(request("no cert")).await.is_err(),
    };
    assert!(refused, "a client without a certificate got through");
    let foreign = tls_client(&sluice, &ca, "localhost", Some(&stranger)).await;
    let refused = match foreign {
        Err(_) => true,
        Ok(mut client) => client.unary(request("foreign")).await.is_err(),
    };
    assert!(refused, "a certificate from another CA got through");

    // With one: accepted, and the backend sees the identity sluice verified, not a forged one.
    let mut client = tls_client(&sluice, &ca, "localhost", Some(&client_cert))
        .await
        .unwrap();
    let mut ask = tonic::Request::new(request("with cert"));
    ask.metadata_mut().insert(
        "x-forwarded-client-cert",
        "Subject=\"CN=forged\"".parse().unwrap(),
    );
    let reply = client.unary(ask).await.unwrap();
    let xfcc = reply
        .metadata()
        .get("x-forwarded-client-cert")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(xfcc.starts_with("Hash="), "{xfcc}");
    assert!(xfcc.contains("Subject=\"CN=client-a\""), "{xfcc}");
    assert!(xfcc.contains("URI=spiffe://test/client-a"), "{xfcc}");
    assert!(!xfcc.contains("forged"), "{xfcc}");

    let logged = support::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("\"client_subject\":\"CN=client-a\""))
    })
    .await;
    assert!(
        logged,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("URI:spiffe://test/client-a"));
    let metrics = sluice.metrics().await;
    let refusals = metric(
        &metrics,
        "sluice_tls_handshake_errors_total",
        "reason=\"client_certificate\"",
    );
    assert!(refusals >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_offers_only_http1_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let server = ca.server(dir.path(), "server", &["localhost"]);
    let backend = Echo::start("b1").await;
    let listener = tls_block(&[(&server.cert_file, &server.key_file)], "");
    let sluice =
        Sluice::start_with_listener(&listener, &Sluice::cluster(&[backend.addr], "")).await;

    let mut roots = rustls::RootCertStore::empty();
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let error = connector.connect(name, tcp).await.unwrap_err();
    assert!(
        error.to_string().contains("NoApplicationProtocol"),
        "{error}"
    );
    let metrics = sluice.metrics().await;
    assert!(
        metric(
            &metrics,
            "sluice_tls_handshake_errors_total",
            "reason=\"no_h2\""
        ) >= 1.0,
        "{metrics}"
    );
    // A plain TCP connect that sends nothing (a load balancer's check) is no handshake error.
    assert_eq!(
        metric(
            &metrics,
            "sluice_tls_handshake_errors_total",
            "reason=\"protocol\""
        ),
        0.0
    );
}

use rustls::pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_on_disk_or_by_sighup_serves_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let live = ca.server(dir.path(), "live", &["localhost"]);
    let backend = Echo::start("b1").await;
    let listener = tls_block(&[(&live.cert_file, &live.key_file)], "");
    let sluice =
        Sluice::start_with_listener(&listener, &Sluice::cluster(&[backend.addr], "")).await;
    let mut established = tls_client(&sluice, &ca, "localhost", None).await.unwrap();
    established.unary(request("before")).await.unwrap();
    assert!(!serves(&sluice, &ca, "rotated.test").await);

    // cert-manager or certbot writes new files: new handshakes get them within 10 s.
    let rotated = ca.server(dir.path(), "rotated", &["localhost", "rotated.test"]);
    rotated.write_to(&live.cert_file, &live.key_file);
    let changed_at = Instant::now();
    let mut picked_up = false;
    while changed_at.elapsed() < Duration::from_secs(12) {
        if serves(&sluice, &ca, "rotated.test").await {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        picked_up,
        "the rotated certificate was not served:\n{}",
        sluice.log()
    );
    assert!(changed_at.elapsed() < Duration::from_secs(11));
    // The established connection goes on.
    established.unary(request("after")).await.unwrap();

    // A bad file is logged once and ignored.
    std::fs::write(&live.cert_file, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let rejected = support::wait_until(Duration::from_secs(12), || {
        sluice.log().contains("new TLS files rejected")
    })
    .await;
    assert!(rejected, "{}", sluice.log());
    assert!(serves(&sluice, &ca, "rotated.test").await);

    // SIGHUP reloads at once.
    let third = ca.server(dir.path(), "third", &["third.test"]);
    third.write_to(&live.cert_file, &live.key_file);
    sluice.signal("HUP");
    let reloaded = support::wait_until(Duration::from_secs(5), || {
        sluice.log().contains("why=\"SIGHUP\"")
            && sluice.log().contains("TLS certificates reloaded")
    })
    .await;
    assert!(reloaded, "{}", sluice.log());
    assert!(serves(&sluice, &ca, "third.test").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_presents_its_client_certificate_to_a_backend_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let backend_cert = ca.server(dir.path(), "backend", &["backend.test"]);
    let sluice_cert = ca.client(dir.path(), "sluice", "sluice", None);
    let ca_file = ca.write(dir.path(), "ca.pem");
    let backend = Echo::start_tls_with(
        "b1",
        &backend_cert.cert_pem,
        &backend_cert.key_pem,
        Some(&ca.cert_pem),
    )
    .await;
    let identity = format!(
        "    tls: {{ ca_file: \"{}\", server_name: backend.test, cert_file: \"{}\", key_file: \"{}\" }}\n",
        ca_file.display(),
        sluice_cert.cert_file.display(),
        sluice_cert.key_file.display()
    );
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], &identity)).await;
    let reply = sluice.client().await.unary(request("mtls")).await.unwrap();
    assert_eq!(reply.into_inner().backend_id, "b1");
    let metrics = sluice.metrics().await;
    let expiry = metric(
        &metrics,
        "sluice_tls_certificate_expiry_timestamp_seconds",
        "cluster=\"echo\"",
    );
    assert!(expiry > 1.7e9, "{metrics}");

    // Without it, the backend refuses the handshake.
    let anonymous = Sluice::start(&tls_cluster(&backend, &ca_file, "backend.test", "")).await;
    let status = anonymous
        .client()
        .await
        .unary(request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

/// Whether a call through `sluice` succeeds within `budget` (each try may open a connection).
async fn serves_within(sluice: &Sluice, budget: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < budget {
        if sluice.client().await.unary(request("try")).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_ca_and_client_certificate_rotated_on_disk_reach_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old CA");
    let new_ca = TestCa::new("new CA");
    // The backend moved to the new CA, for its own certificate and for its clients'.
    let backend_cert = new_ca.server(dir.path(), "backend", &["backend.test"]);
    let backend = Echo::start_tls_with(
        "b1",
        &backend_cert.cert_pem,
        &backend_cert.key_pem,
        Some(&new_ca.cert_pem),
    )
    .await;
    let ca_file = old_ca.write(dir.path(), "ca.pem");
    let ours = old_ca.client(dir.path(), "sluice", "sluice", None);
    let tls = format!(
        "    tls: {{ ca_file: \"{}\", server_name: backend.test, cert_file: \"{}\", key_file: \"{}\" }}\n",
        ca_file.display(),
        ours.cert_file.display(),
        ours.key_file.display()
    );
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], &tls)).await;
    let status = sluice.client().await.unary(request("x")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // A bad CA file is logged and ignored: the old one stays.
    std::fs::write(&ca_file, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let rejected = support::wait_until(Duration::from_secs(12), || {
        let log = sluice.log();
        log.contains("new TLS files rejected") && log.contains("cluster=echo")
    })
    .await;
    assert!(rejected, "{}", sluice.log());

    // cert-manager writes the new CA and client certificate: new connections use them,
    // without a SIGHUP.
    new_ca.write(dir.path(), "ca.pem");
    new_ca
        .client(dir.path(), "renewed", "sluice", None)
        .write_to(&ours.cert_file, &ours.key_file);
    assert!(
        serves_within(&sluice, Duration::from_secs(15)).await,
        "{}",
        sluice.log()
    );
    let log = sluice.log();
    assert!(log.contains("TLS certificates reloaded"), "{log}");
    assert!(!log.contains("SIGHUP"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listener_lets_a_client_set_the_identity_header() {
    // A cleartext listener: a client's own x-forwarded-client-cert never reaches a backend.
    let backend = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut ask = tonic::Request::new(request("forged"));
    let forged = "Hash=00;Subject=\"CN=admin\"".parse().unwrap();
    ask.metadata_mut().insert("x-forwarded-client-cert", forged);
    let reply = sluice.client().await.unary(ask).await.unwrap();
    assert!(
        reply.metadata().get("x-forwarded-client-cert").is_none(),
        "{:?}",
        reply.metadata()
    );
}
