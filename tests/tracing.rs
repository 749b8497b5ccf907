//! Tracing: W3C trace context through sluice, and spans exported over OTLP to a real
//! receiver (a tonic `TraceService` server written here with opentelemetry-proto).
#![cfg(feature = "otlp")]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use sluice::demo::pb::echo_client::EchoClient;
use sluice::demo::pb::EchoResponse;
use support::{request, unused_port, wait_until, Echo, EchoRequest, RefusingBackend, Sluice};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// An OTLP trace receiver on loopback that keeps every span it is sent.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    /// While set, exports hang without an answer: a collector that stopped responding.
    hung: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Collect {
    spans: Arc<Mutex<Vec<Span>>>,
    hung: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.hung.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let spans = request.into_inner().resource_spans.into_iter();
        let spans = spans.flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collect = Collect {
            spans: Arc::default(),
            hung: Arc::default(),
        };
        let receiver = Receiver {
            addr,
            spans: Arc::clone(&collect.spans),
            hung: Arc::clone(&collect.hung),
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collect))
                .serve_with_incoming(incoming)
                .await;
        });
        receiver
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until the spans of trace `trace_id` number `count`.
    async fn wait_trace(&self, trace_id: &[u8], count: usize) -> Vec<Span> {
        let arrived = wait_until(Duration::from_secs(10), || {
            self.spans()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .count()
                >= count
        })
        .await;
        let spans: Vec<Span> = (self.spans().into_iter())
            .filter(|s| s.trace_id == trace_id)
            .collect();
        assert!(
            arrived,
            "{} spans of the trace arrived: {spans:#?}",
            spans.len()
        );
        spans
    }
}

fn tracing_config(endpoint: SocketAddr, ratio: f64) -> String {
    format!("tracing:\n  otlp: {{ endpoint: \"http://{endpoint}\", timeout: 1s }}\n  sampling: {{ ratio: {ratio} }}\n")
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    let found = span.attributes.iter().find(|a| a.key == key)?;
    found.value.as_ref()?.value.as_ref()
}

fn text(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(Value::StringValue(text)) => text.clone(),
        other => panic!("{key} is {other:?} in {span:#?}"),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("{key} is {other:?} in {span:#?}"),
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Up to four traced calls (sampled); the first that a second attempt (a retry or a hedge)
/// answered: its backend saw `grpc-previous-rpc-attempts`.
async fn second_attempt_answered(
    client: &mut EchoClient<Channel>,
) -> Option<tonic::Response<EchoResponse>> {
    for i in 0..4 {
        let reply = client
            .unary(traced(&format!("call {i}"), "01"))
            .await
            .unwrap();
        if reply.metadata().get("x-echo-previous-attempts").is_some() {
            return Some(reply);
        }
    }
    None
}

fn traced(message: &str, flags: &str) -> tonic::Request<EchoRequest> {
    let mut call = tonic::Request::new(request(message));
    let parent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-{flags}");
    let value: MetadataValue<_> = parent.parse().unwrap();
    call.metadata_mut().insert("traceparent", value);
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_exports_one_server_span_with_two_attempt_children() {
    let receiver = Receiver::start().await;
    let refusing = RefusingBackend::start().await;
    let healthy = Echo::start("healthy").await;
    let config = Sluice::cluster(
        &[refusing.addr, healthy.addr],
        "    balancer: round_robin\n    retry: { max_attempts: 2, budget_ratio: 1.0 }\n",
    ) + &tracing_config(receiver.addr, 0.0);
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    // Round robin: one of two calls starts on the refusing backend and is retried.
    let retried = second_attempt_answered(&mut client)
        .await
        .expect("a call was retried");
    let seen = retried.metadata().get("x-echo-previous-attempts").unwrap();
    assert_eq!(seen, "1", "the retry names the attempt before it");
    let upstream_parent = retried.metadata().get("x-echo-traceparent").unwrap();
    let upstream_parent = upstream_parent.to_str().unwrap().to_string();
    let spans = receiver.wait_trace(&hex(TRACE_ID), 3).await;
    // The retried call's spans: its attempts carry the server span as parent.
    let server = (spans.iter())
        .find(|s| {
            s.kind == SpanKind::Server as i32 && {
                let children = spans.iter().filter(|c| c.parent_span_id == s.span_id);
                children.count() == 2
            }
        })
        .unwrap_or_else(|| panic!("no server span with two children: {spans:#?}"));
    assert_eq!(
        server.parent_span_id,
        hex(CLIENT_SPAN),
        "the client's span is the parent"
    );
    assert_eq!(server.name, "echo.v1.Echo/Unary");
    assert_eq!(text(server, "rpc.system"), "grpc");
    assert_eq!(text(server, "rpc.service"), "echo.v1.Echo");
    assert_eq!(text(server, "rpc.method"), "Unary");
    assert_eq!(int(server, "rpc.grpc.status_code"), 0);
    let mut attempts: Vec<&Span> = (spans.iter())
        .filter(|c| c.parent_span_id == server.span_id)
        .collect();
    attempts.sort_by_key(|s| int(s, "sluice.attempt.number"));
    let (first, retry) = (attempts[0], attempts[1]);
    assert!(attempts.iter().all(|a| a.kind == SpanKind::Client as i32));
    assert_eq!(text(first, "sluice.attempt.kind"), "first");
    assert_eq!(int(first, "server.port"), i64::from(refusing.addr.port()));
    assert_eq!(
        int(first, "rpc.grpc.status_code"),
        14,
        "refused: UNAVAILABLE"
    );
    assert_eq!(first.status.as_ref().unwrap().code, 2, "an error status");
    assert_eq!(text(retry, "sluice.attempt.kind"), "retry");
    assert_eq!(int(retry, "server.port"), i64::from(healthy.addr.port()));
    assert_eq!(int(retry, "rpc.grpc.status_code"), 0);
    assert!(first.end_time_unix_nano <= retry.start_time_unix_nano);
    assert!(server.start_time_unix_nano <= first.start_time_unix_nano);
    assert!(retry.end_time_unix_nano <= server.end_time_unix_nano);
    // The backend saw the trace, with the retry attempt's span as its parent.
    let retry_id: String = retry.span_id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(upstream_parent, format!("00-{TRACE_ID}-{retry_id}-01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_calls_are_dropped_unless_they_fail_and_new_traces_go_upstream() {
    let receiver = Receiver::start().await;
    let backend = Echo::start("only").await;
    let config = Sluice::cluster(&[backend.addr], "") + &tracing_config(receiver.addr, 0.0);
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    // The parent said "not sampled": an OK call is not exported.
    let reply = client.unary(traced("quiet", "00")).await.unwrap();
    let upstream = reply
        .metadata()
        .get("x-echo-traceparent")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(upstream.starts_with(&format!("00-{TRACE_ID}-")) && upstream.ends_with("-00"));
    assert!(
        !upstream.contains(CLIENT_SPAN),
        "sluice's attempt span is the parent"
    );
    // ...but one that fails is.
    let mut failing = traced("fails", "00");
    failing.get_mut().fail_code = tonic::Code::Internal as i32;
    let status = client.unary(failing).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    let spans = receiver.wait_trace(&hex(TRACE_ID), 2).await;
    assert_eq!(spans.len(), 2, "only the failed call: {spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(int(server, "rpc.grpc.status_code"), 13);
    assert_eq!(server.status.as_ref().unwrap().code, 2);
    // A call without a trace starts one, and the backend sees it.
    let reply = client.unary(request("new")).await.unwrap();
    let upstream = reply
        .metadata()
        .get("x-echo-traceparent")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(upstream.len(), 55, "{upstream}");
    assert!(!upstream.contains(TRACE_ID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_trace_headers_pass_through_unchanged() {
    let backend = Echo::start("only").await;
    let sluice = Sluice::start(&Sluice::cluster(&[backend.addr], "")).await;
    let mut client = sluice.client().await;
    let reply = client.unary(traced("through", "01")).await.unwrap();
    let upstream = reply.metadata().get("x-echo-traceparent").unwrap();
    assert_eq!(upstream, &format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_not_calls() {
    let backend = Echo::start("only").await;
    let absent: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
    let config = Sluice::cluster(&[backend.addr], "") + &tracing_config(absent, 1.0);
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    for i in 0..200 {
        let reply = client.unary(request(&format!("call {i}"))).await;
        assert!(reply.is_ok(), "call {i}: {reply:?}");
    }
    // The exports fail, and their spans are counted as dropped.
    let dropped = wait_until(Duration::from_secs(10), || {
        let metrics = futures_block(sluice.metrics());
        dropped_spans(&metrics, "export_failed") > 0.0
    })
    .await;
    assert!(dropped, "{}", sluice.metrics().await);
    assert!(
        sluice.log().contains("OTLP export failing"),
        "{}",
        sluice.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_then_recovers_gets_spans_again() {
    let receiver = Receiver::start().await;
    let backend = Echo::start("only").await;
    let config = Sluice::cluster(&[backend.addr], "") + &tracing_config(receiver.addr, 1.0);
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    client.unary(request("before")).await.unwrap();
    assert!(wait_until(Duration::from_secs(10), || !receiver.spans().is_empty()).await);
    receiver.hung.store(true, Ordering::Relaxed);
    for i in 0..20 {
        client
            .unary(request(&format!("while hung {i}")))
            .await
            .unwrap();
    }
    let failing = wait_until(Duration::from_secs(10), || {
        sluice.log().contains("OTLP export failing")
    })
    .await;
    assert!(failing, "{}", sluice.log());
    receiver.hung.store(false, Ordering::Relaxed);
    let before = receiver.spans().len();
    for i in 0..20 {
        client.unary(request(&format!("after {i}"))).await.unwrap();
    }
    let back = wait_until(Duration::from_secs(20), || {
        sluice.log().contains("OTLP export recovered") && receiver.spans().len() > before
    })
    .await;
    assert!(back, "{}", sluice.log());
}

fn dropped_spans(metrics: &str, reason: &str) -> f64 {
    let wanted = format!("sluice_trace_spans_dropped_total{{reason=\"{reason}\"}} ");
    (metrics.lines())
        .find_map(|l| l.strip_prefix(wanted.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs a future to its end from a synchronous condition (on the test's runtime).
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// An OTLP/HTTP receiver: protobuf bodies POSTed to `/v1/traces`, over HTTP/1.1.
async fn http_receiver() -> (SocketAddr, Arc<Mutex<Vec<(String, Span)>>>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
    let kept = Arc::clone(&spans);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            let serve = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        let path = request.uri().path().to_string();
                        let body = request.into_body().collect().await?.to_bytes();
                        let export = <ExportTraceServiceRequest as prost::Message>::decode(body);
                        let mut kept = kept.lock().unwrap();
                        for sent in export.map(|e| e.resource_spans).unwrap_or_default() {
                            let resource = sent.resource.unwrap_or_default();
                            let service = (resource.attributes.iter())
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.clone()?.value);
                            let label = format!("{path} {service:?}");
                            let spans = sent.scope_spans.into_iter().flat_map(|s| s.spans);
                            kept.extend(spans.map(|s| (label.clone(), s)));
                        }
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(tcp);
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, serve));
        }
    });
    (addr, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_otlp_http_too() {
    let (addr, spans) = http_receiver().await;
    let backend = Echo::start("only").await;
    let config = Sluice::cluster(&[backend.addr], "")
        + &format!("tracing:\n  otlp: {{ endpoint: \"http://{addr}\", protocol: http }}\n  sampling: {{ ratio: 1.0 }}\n  service_name: edge\n");
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    client.unary(request("over http")).await.unwrap();
    let arrived = wait_until(Duration::from_secs(10), || spans.lock().unwrap().len() >= 2).await;
    assert!(arrived, "{}", sluice.log());
    let spans = spans.lock().unwrap().clone();
    let sent_as = "/v1/traces Some(StringValue(\"edge\"))";
    assert!(
        spans.iter().all(|(label, _)| label == sent_as),
        "{spans:#?}"
    );
    let kinds: Vec<i32> = spans.iter().map(|(_, s)| s.kind).collect();
    assert!(
        kinds.contains(&(SpanKind::Server as i32)) && kinds.contains(&(SpanKind::Client as i32))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_call_exports_the_cancelled_first_attempt_and_the_winning_hedge() {
    let receiver = Receiver::start().await;
    let slow = Echo::start_with_delay("slow", Duration::from_secs(2)).await;
    let fast = Echo::start("fast").await;
    let cluster = Sluice::cluster(
        &[slow.addr, fast.addr],
        "    balancer: round_robin\n    retry: { budget_ratio: 1.0 }\n",
    );
    let routes = "routes:\n  - cluster: echo\n    hedging: { delay: 30ms, budget_ratio: 1.0 }\n";
    let config = cluster + routes + &tracing_config(receiver.addr, 0.0);
    let sluice = Sluice::start(&config).await;
    let mut client = sluice.client().await;
    let hedged = second_attempt_answered(&mut client).await;
    assert!(hedged.is_some(), "no call was hedged");
    let spans = receiver.wait_trace(&hex(TRACE_ID), 3).await;
    let hedge = (spans.iter())
        .find(|s| {
            attribute(s, "sluice.attempt.kind").is_some()
                && text(s, "sluice.attempt.kind") == "hedge"
        })
        .unwrap_or_else(|| panic!("no hedge span: {spans:#?}"));
    assert_eq!(int(hedge, "server.port"), i64::from(fast.addr.port()));
    assert_eq!(int(hedge, "rpc.grpc.status_code"), 0);
    let server = (spans.iter())
        .find(|s| s.span_id == hedge.parent_span_id)
        .unwrap();
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(int(server, "sluice.attempts"), 2);
    let first = (spans.iter())
        .find(|s| s.parent_span_id == server.span_id && s.span_id != hedge.span_id)
        .unwrap();
    assert_eq!(text(first, "sluice.attempt.kind"), "first");
    assert_eq!(int(first, "server.port"), i64::from(slow.addr.port()));
    assert!(matches!(
        attribute(first, "sluice.hedge.lost"),
        Some(Value::BoolValue(true))
    ));
    assert_eq!(
        first.status.as_ref().map_or(0, |s| s.code),
        0,
        "not an error: it lost a race"
    );
}
