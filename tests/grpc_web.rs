//! gRPC-Web on a listener (`grpc_web`): calls in binary and text mode over HTTP/1.1 and
//! HTTP/2, translated to native gRPC for the backends; CORS answered by sluice; and every
//! answer sluice makes itself readable by a page. (The browser test is tests/browser.rs.)

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use prost::Message;
use sluice::demo::pb::EchoResponse;
use support::{request, Echo, EchoRequest, Sluice};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const ORIGIN: &str = "http://app.test";

/// The listener's `grpc_web` block.
const GRPC_WEB: &str = "    grpc_web:\n      allowed_origins: [\"http://app.test\", \"https://*.example.com\"]\n      allowed_headers: [x-custom]\n      exposed_headers: [x-backend-id, x-custom]\n";

async fn web_sluice(backends: &[SocketAddr], extra: &str) -> Sluice {
    web_sluice_logging(backends, extra, "{}").await
}

/// With `access_log: LOG`.
async fn web_sluice_logging(backends: &[SocketAddr], extra: &str, log: &str) -> Sluice {
    let rest = format!(
        "{}routes:\n  - match: {{ service: echo.v1.Echo }}\n    cluster: echo\naccess_log: {log}\n",
        Sluice::cluster(backends, extra)
    );
    Sluice::start_with_listener(GRPC_WEB, &rest).await
}

/// One gRPC frame holding `message`.
fn framed(message: &EchoRequest) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    frame
}

/// An HTTP/1.1 answer: status, headers (lower-case names), and the de-chunked body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When each body chunk arrived, from the request's start.
    chunk_times: Vec<Duration>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body's gRPC-Web frames: messages, then the trailers (as text).
    fn frames(&self, text: bool) -> (Vec<EchoResponse>, Option<String>) {
        let body = match text {
            true => STANDARD.decode(&self.body).expect("base64 body"),
            false => self.body.clone(),
        };
        let (mut messages, mut trailers, mut at) = (Vec::new(), None, 0);
        while at + 5 <= body.len() {
            let flag = body[at];
            let len = u32::from_be_bytes(body[at + 1..at + 5].try_into().unwrap()) as usize;
            let payload = &body[at + 5..at + 5 + len];
            match flag {
                0 => messages.push(EchoResponse::decode(payload).expect("a message")),
                0x80 => trailers = Some(String::from_utf8_lossy(payload).into_owned()),
                other => panic!("frame flag {other}"),
            }
            at += 5 + len;
        }
        assert_eq!(at, body.len(), "trailing bytes");
        (messages, trailers)
    }
}

/// Sends one HTTP/1.1 request; the body goes in chunks of `chunk` bytes (chunked encoding)
/// when `chunk` is set, else with a content length.
async fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunk: Option<usize>,
) -> Answer {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    exchange(&mut tcp, addr, method, path, headers, body, chunk).await
}

/// One HTTP/1.1 request and its answer on `tcp` (plain, or TLS).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunk: Option<usize>,
) -> Answer {
    let started = Instant::now();
    let mut head = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(name, _)| *name == "host") {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match chunk {
        None => head.push_str(&format!("content-length: {}\r\n\r\n", body.len())),
        Some(_) => head.push_str("transfer-encoding: chunked\r\n\r\n"),
    }
    tcp.write_all(head.as_bytes()).await.unwrap();
    match chunk {
        None => tcp.write_all(body).await.unwrap(),
        Some(size) => {
            for piece in body.chunks(size) {
                let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                tcp.write_all(&chunk).await.unwrap();
                tcp.flush().await.unwrap();
            }
            tcp.write_all(b"0\r\n\r\n").await.unwrap();
        }
    }
    read_answer(tcp, started).await
}

async fn read_answer<S: AsyncRead + Unpin>(tcp: &mut S, started: Instant) -> Answer {
    let mut raw = Vec::new();
    let mut chunk_times = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        if read == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..read]);
        chunk_times.push(started.elapsed());
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
        .collect();
    let mut rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked");
    let mut body = Vec::new();
    if chunked {
        loop {
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap(), 16).unwrap();
            rest = &rest[end + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else {
        body = rest.to_vec();
    }
    Answer {
        status,
        headers,
        body,
        chunk_times,
    }
}

fn web_headers(content_type: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("content-type", content_type),
        ("x-grpc-web", "1"),
        ("origin", ORIGIN),
    ]
}

#[tokio::test]
async fn unary_calls_in_binary_and_text_mode_reach_the_backend_and_come_back() {
    let echo = Echo::start("b1").await;
    let sluice = web_sluice(&[echo.addr], "").await;
    let body = framed(&request("hello"));
    let binary = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &web_headers("application/grpc-web+proto"),
        &body,
        None,
    )
    .await;
    assert_eq!(binary.status, 200);
    assert_eq!(
        binary.header("content-type"),
        Some("application/grpc-web+proto")
    );
    assert_eq!(binary.header("access-control-allow-origin"), Some(ORIGIN));
    let (messages, trailers) = binary.frames(false);
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (
            messages[0].message.as_str(),
            messages[0].backend_id.as_str()
        ),
        ("hello", "b1")
    );
    assert!(trailers.unwrap().contains("grpc-status: 0\r\n"));
    // Text mode, the body split at every byte on the way in.
    let text_body = STANDARD.encode(framed(&request("hello text")));
    let text = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &web_headers("application/grpc-web-text"),
        text_body.as_bytes(),
        Some(1),
    )
    .await;
    assert_eq!(
        text.header("content-type"),
        Some("application/grpc-web-text")
    );
    let (messages, trailers) = text.frames(true);
    assert_eq!(messages[0].message, "hello text");
    assert!(trailers.unwrap().contains("grpc-status: 0"));
    // Each message base64'd on its own (padded), as some clients send it.
    let two = [
        STANDARD.encode(&framed(&request("one"))[..4]),
        STANDARD.encode(&framed(&request("one"))[4..]),
    ]
    .concat();
    let padded = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &web_headers("application/grpc-web-text"),
        two.as_bytes(),
        None,
    )
    .await;
    assert_eq!(padded.frames(true).0[0].message, "one");
    assert_eq!(echo.calls(), 3);
}

#[tokio::test]
async fn server_streaming_sends_each_message_as_it_arrives() {
    let echo = Echo::start("b1").await;
    let sluice = web_sluice(&[echo.addr], "").await;
    let many = EchoRequest {
        repeat: 100,
        ..request("s")
    };
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/ServerStream",
        &web_headers("application/grpc-web"),
        &framed(&many),
        None,
    )
    .await;
    let (messages, trailers) = answer.frames(false);
    assert_eq!(messages.len(), 100);
    assert!(trailers.unwrap().contains("grpc-status: 0"));
    // Three messages 300 ms apart: the first reaches the client long before the last.
    let slow = EchoRequest {
        repeat: 3,
        sleep_ms: 300,
        ..request("slow")
    };
    let text = STANDARD.encode(framed(&slow));
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/ServerStream",
        &web_headers("application/grpc-web-text"),
        text.as_bytes(),
        None,
    )
    .await;
    assert_eq!(answer.frames(true).0.len(), 3);
    let first = answer.chunk_times[0];
    let last = *answer.chunk_times.last().unwrap();
    assert!(
        last - first >= Duration::from_millis(450),
        "{:?}",
        answer.chunk_times
    );
}

#[tokio::test]
async fn every_status_reaches_the_page_with_its_cors_headers() {
    let echo = Echo::start("b1").await;
    let sluice = web_sluice(&[echo.addr], "").await;
    let headers = web_headers("application/grpc-web");
    // The backend fails at once: a trailers-only answer keeps its status in the headers.
    let failing = EchoRequest {
        fail_code: 5,
        fail_message: "no such thing".into(),
        ..request("f")
    };
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &headers,
        &framed(&failing),
        None,
    )
    .await;
    assert_eq!(
        (answer.status, answer.header("grpc-status")),
        (200, Some("5"))
    );
    // Percent-encoded, as gRPC sends it (the client library decodes it).
    assert_eq!(answer.header("grpc-message"), Some("no%20such%20thing"));
    assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
    let exposed = answer.header("access-control-expose-headers").unwrap();
    assert!(
        exposed.contains("grpc-status")
            && exposed.contains("grpc-message")
            && exposed.contains("x-custom"),
        "{exposed}"
    );
    // After a message of a server stream: the status is in the trailer frame, with the
    // custom trailer.
    let late = EchoRequest {
        fail_after_headers: true,
        ..failing.clone()
    };
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/ServerStream",
        &headers,
        &framed(&late),
        None,
    )
    .await;
    let trailers = answer.frames(false).1.unwrap();
    assert!(
        trailers.contains("grpc-status: 5\r\n") && trailers.contains("x-trailer: custom"),
        "{trailers}"
    );
    // sluice's own answers: no route, a deadline.
    let answer = http1(
        sluice.addr,
        "POST",
        "/other.v1.Other/Call",
        &headers,
        &framed(&request("x")),
        None,
    )
    .await;
    assert_eq!(answer.header("grpc-status"), Some("12"));
    assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
    let mut timed = headers.clone();
    timed.push(("grpc-timeout", "100m"));
    let sleepy = EchoRequest {
        sleep_ms: 2000,
        ..request("late")
    };
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &timed,
        &framed(&sleepy),
        None,
    )
    .await;
    let status = answer
        .header("grpc-status")
        .map(str::to_string)
        .or_else(|| {
            let trailers = answer.frames(false).1?;
            trailers.lines().find_map(|l| {
                l.strip_prefix("grpc-status: ")
                    .map(|s| s.trim().to_string())
            })
        });
    assert_eq!(status.as_deref(), Some("4"), "{:?}", answer.headers);
    assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
    // Custom metadata both ways.
    let mut custom = headers.clone();
    custom.push(("x-custom", "from-page"));
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &custom,
        &framed(&request("m")),
        None,
    )
    .await;
    assert_eq!(answer.header("x-custom"), Some("from-page"));
    assert_eq!(answer.header("x-backend-id"), Some("b1"));
}

#[tokio::test]
async fn preflights_are_answered_by_sluice_and_never_forwarded() {
    let echo = Echo::start("b1").await;
    let sluice = web_sluice(&[echo.addr], "").await;
    let asking = |origin: &'static str| {
        vec![
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type,x-grpc-web,x-custom",
            ),
        ]
    };
    let allowed = http1(
        sluice.addr,
        "OPTIONS",
        "/echo.v1.Echo/Unary",
        &asking("https://a.example.com"),
        b"",
        None,
    )
    .await;
    assert_eq!(allowed.status, 204);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://a.example.com")
    );
    assert!(allowed
        .header("access-control-allow-headers")
        .unwrap()
        .contains("x-custom"));
    assert_eq!(allowed.header("access-control-max-age"), Some("600"));
    let refused = http1(
        sluice.addr,
        "OPTIONS",
        "/echo.v1.Echo/Unary",
        &asking("https://evil.test"),
        b"",
        None,
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(refused.header("access-control-allow-origin").is_none());
    // A call from a refused origin is served (the browser is what blocks it) without CORS
    // headers, and counted.
    let mut evil = web_headers("application/grpc-web");
    evil[2] = ("origin", "https://evil.test");
    let call = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &evil,
        &framed(&request("x")),
        None,
    )
    .await;
    assert!(call.header("access-control-allow-origin").is_none());
    assert_eq!(echo.calls(), 1, "a preflight reached the backend");
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_grpc_web_origin_refused_total{listener=\"grpc\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn grpc_web_calls_are_balanced_counted_and_logged_like_native_ones() {
    let backends = [
        Echo::start("b1").await,
        Echo::start("b2").await,
        Echo::start("b3").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let log = format!("{{ path: \"{}\" }}", log_path.display());
    let sluice = web_sluice_logging(&addrs, "    balancer: round_robin\n", &log).await;
    for _ in 0..30 {
        let answer = http1(
            sluice.addr,
            "POST",
            "/echo.v1.Echo/Unary",
            &web_headers("application/grpc-web"),
            &framed(&request("b")),
            None,
        )
        .await;
        assert_eq!(answer.frames(false).0.len(), 1);
    }
    for backend in &backends {
        assert_eq!(backend.calls(), 10);
    }
    // Counted once the call ends, a moment after its last bytes reached the client.
    let counted = "sluice_requests_total{cluster=\"echo\",grpc_code=\"OK\",grpc_method=\"Unary\",grpc_service=\"echo.v1.Echo\",origin=\"upstream\"} 30";
    let end = Instant::now() + Duration::from_secs(5);
    let mut metrics = sluice.metrics().await;
    while !metrics.contains(counted) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = sluice.metrics().await;
    }
    assert!(metrics.contains(counted), "{metrics}");
    let logged = support::wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        text.matches("\"protocol\":\"grpc-web\"").count() == 30
    })
    .await;
    assert!(
        logged,
        "{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}

#[tokio::test]
async fn a_listener_without_grpc_web_still_answers_http1_with_505() {
    let echo = Echo::start("b1").await;
    let sluice = Sluice::start(&Sluice::cluster(&[echo.addr], "")).await;
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &web_headers("application/grpc-web"),
        &framed(&request("x")),
        None,
    )
    .await;
    assert_eq!(answer.status, 505);
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn a_tls_listener_offers_http1_in_alpn_for_grpc_web() {
    use support::pki::TestCa;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let server = ca.server(dir.path(), "server", &["localhost"]);
    let echo = Echo::start("b1").await;
    let listener = format!(
        "    tls:\n      cert_file: \"{}\"\n      key_file: \"{}\"\n{GRPC_WEB}",
        server.cert_file.display(),
        server.key_file.display()
    );
    let rest = format!(
        "{}routes:\n  - match: {{ service: echo.v1.Echo }}\n    cluster: echo\n",
        Sluice::cluster(&[echo.addr], "")
    );
    let sluice = Sluice::start_with_listener(&listener, &rest).await;
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(sluice.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("a TLS handshake offering only http/1.1");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let answer = exchange(
        &mut tls,
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &web_headers("application/grpc-web"),
        &framed(&request("tls")),
        None,
    )
    .await;
    assert_eq!(answer.frames(false).0[0].message, "tls");
}

/// Serves `tests/web/dist` (the bundled page) on a loopback port: the page's origin.
async fn serve_page() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web/dist");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let dist = dist.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let n = tcp.read(&mut head).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&head[..n]).into_owned();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let file = path
                    .split('?')
                    .next()
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let (status, kind, body) = match file {
                    "index.html" | "grpc-web-test.js" => {
                        let kind = if file.ends_with(".js") {
                            "text/javascript"
                        } else {
                            "text/html"
                        };
                        (
                            "200 OK",
                            kind,
                            std::fs::read(dist.join(file)).unwrap_or_default(),
                        )
                    }
                    _ => ("404 Not Found", "text/plain", b"not here".to_vec()),
                };
                let head = format!("HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(&body).await;
            });
        }
    });
    addr
}

/// Opens the page in headless Chromium (at most 90 s of real time) and returns its results.
fn run_page(page: SocketAddr, target: SocketAddr, suite: &str) -> serde_json::Value {
    let url = format!("http://{page}/index.html?target=http://{target}&suite={suite}");
    let output = std::process::Command::new("timeout")
        .args([
            "90",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args(["--virtual-time-budget=60000", "--dump-dom", &url])
        .output()
        .expect("run chromium (Debian package chromium; scripts/setup installs it)");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let start = dom
        .find("<pre id=\"results\">")
        .map(|i| i + "<pre id=\"results\">".len());
    let text = start.and_then(|s| dom[s..].find("</pre>").map(|e| &dom[s..s + e]));
    let text = text.unwrap_or_else(|| {
        panic!(
            "no results in:\n{dom}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_calls_through_sluice_with_real_grpc_web_libraries() {
    let echo = Echo::start("b1").await;
    let (page, elsewhere) = (serve_page().await, serve_page().await);
    let listener = format!(
        "    grpc_web:\n      allowed_origins: [\"http://{page}\"]\n      allowed_headers: [x-custom]\n      exposed_headers: [x-backend-id, x-custom]\n"
    );
    // echo.v1.Echo and its package route to the backend; /nowhere/... routes nowhere.
    let rest = format!(
        "{}routes:\n  - match: {{ service: echo.v1.Echo }}\n    cluster: echo\n  - match: {{ prefix: /echo.v1. }}\n    cluster: echo\n",
        Sluice::cluster(&[echo.addr], "")
    );
    let sluice = Sluice::start_with_listener(&listener, &rest).await;
    let target = sluice.addr;
    let results = tokio::task::spawn_blocking(move || run_page(page, target, "full"))
        .await
        .unwrap();
    let cases = &results["cases"];
    let case = |name: &str| cases[name].clone();
    for mode in ["binary", "text"] {
        let name = |n: &str| format!("{n}_{mode}");
        let unary = case(&name("unary"));
        assert_eq!(unary["ok"], true, "{unary}");
        assert!(
            unary["detail"]["message"]
                .as_str()
                .unwrap()
                .starts_with("hello"),
            "{unary}"
        );
        let stream = case(&name("server_stream"));
        assert_eq!(
            (stream["ok"].clone(), stream["detail"]["count"].clone()),
            (true.into(), 100.into()),
            "{stream}"
        );
        let failed = case(&name("backend_error"));
        assert_eq!(
            (failed["code"].clone(), failed["message"].clone()),
            (5.into(), "no such thing".into()),
            "{failed}"
        );
        assert_eq!(
            case(&name("no_route"))["code"],
            12,
            "{}",
            case(&name("no_route"))
        );
        let metadata = case(&name("metadata"));
        assert_eq!(metadata["detail"]["echoed"], "from-browser", "{metadata}");
        assert_eq!(metadata["detail"]["backend"], "b1", "{metadata}");
        assert_eq!(
            case(&name("empty_unary"))["ok"],
            true,
            "{}",
            case(&name("empty_unary"))
        );
        let large = case(&name("large_unary"));
        assert_eq!(large["detail"]["same"], true, "{large}");
        let special = case(&name("special_message"));
        assert_eq!(
            (special["code"].clone(), special["detail"]["equal"].clone()),
            (2.into(), true.into()),
            "{special}"
        );
        assert_eq!(
            case(&name("unimplemented_method"))["code"],
            12,
            "{}",
            case(&name("unimplemented_method"))
        );
        assert_eq!(
            case(&name("unimplemented_service"))["code"],
            12,
            "{}",
            case(&name("unimplemented_service"))
        );
    }
    // From an origin not on the list: the browser blocks the call; the preflight is answered
    // by sluice (403) and never reaches the backend.
    let before = echo.calls();
    let blocked = tokio::task::spawn_blocking(move || run_page(elsewhere, target, "blocked"))
        .await
        .unwrap();
    let blocked = &blocked["cases"]["blocked"];
    assert_eq!(blocked["ok"], false, "{blocked}");
    assert_eq!(echo.calls(), before);
    let metrics = sluice.metrics().await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_grpc_web_origin_refused_total{listener=\"grpc\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
}

#[tokio::test]
async fn no_backend_and_rate_limits_are_grpc_web_answers_too() {
    let refused = support::RefusedAddrs::new(1);
    let echo = Echo::start("b1").await;
    let rest = format!(
        "clusters:\n  - name: gone\n    discovery:\n      static: [\"{}\"]\n  - name: echo\n    discovery:\n      static: [\"{}\"]\nroutes:\n  - match: {{ headers: [{{ name: x-to, exact: gone }}] }}\n    cluster: gone\n  - cluster: echo\n    rate_limit: {{ rate: 1/m, burst: 1, per: route }}\n",
        refused.addrs[0], echo.addr
    );
    let sluice = Sluice::start_with_listener(GRPC_WEB, &rest).await;
    let status_of = |answer: &Answer| answer.header("grpc-status").map(str::to_string);
    let mut to_gone = web_headers("application/grpc-web-text");
    to_gone.push(("x-to", "gone"));
    let body = STANDARD.encode(framed(&request("x")));
    let gone = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &to_gone,
        body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(
        (gone.status, status_of(&gone).as_deref()),
        (200, Some("14")),
        "{:?}",
        gone.headers
    );
    assert_eq!(
        gone.header("content-type"),
        Some("application/grpc-web-text")
    );
    assert_eq!(gone.header("access-control-allow-origin"), Some(ORIGIN));
    let headers = web_headers("application/grpc-web");
    let first = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &headers,
        &framed(&request("a")),
        None,
    )
    .await;
    assert_eq!(first.frames(false).0.len(), 1);
    let limited = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &headers,
        &framed(&request("b")),
        None,
    )
    .await;
    assert_eq!(
        status_of(&limited).as_deref(),
        Some("8"),
        "{:?}",
        limited.headers
    );
    assert!(
        limited.header("grpc-retry-pushback-ms").is_some(),
        "{:?}",
        limited.headers
    );
    let exposed = limited.header("access-control-expose-headers").unwrap();
    assert!(exposed.contains("grpc-retry-pushback-ms"), "{exposed}");
}

#[tokio::test]
async fn the_backend_sees_the_authority_the_page_asked_for_and_no_length_it_cannot_keep() {
    // A backend that reports each call's :authority and answers with a content-length, which
    // the text mode's re-framing would make wrong.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let backend = support::ScriptedListener::start(move |tcp| {
        let seen_tx = seen_tx.clone();
        async move {
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let authority = request.uri().authority().map(|a| a.to_string());
                let _ = seen_tx.send(authority.unwrap_or_default());
                let message = framed(&request_reply());
                let head = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("content-length", message.len())
                    .body(())
                    .unwrap();
                let Ok(mut body) = respond.send_response(head, false) else {
                    return;
                };
                let _ = body.send_data(message.into(), false);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = body.send_trailers(trailers);
            }
        }
    })
    .await;
    let sluice = web_sluice(&[backend.addr], "").await;
    let mut headers = web_headers("application/grpc-web-text");
    headers.push(("host", "api.example.test:8443"));
    let body = STANDARD.encode(framed(&request("a")));
    let answer = http1(
        sluice.addr,
        "POST",
        "/echo.v1.Echo/Unary",
        &headers[..],
        body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(
        answer.header("content-length"),
        None,
        "{:?}",
        answer.headers
    );
    assert_eq!(answer.frames(true).0.len(), 1);
    let authority = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .unwrap();
    assert_eq!(authority.as_deref(), Some("api.example.test:8443"));
}

/// The bytes of an `EchoRequest` message, framed like an answer (the client decodes it as
/// an `EchoResponse`: the same first field).
fn request_reply() -> EchoRequest {
    request("reply")
}
