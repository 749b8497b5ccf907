//! OTLP export of finished calls' spans, on a thread of its own: batches of up to
//! `BATCH_CALLS` calls, sent at least once a second, over gRPC (tonic) or HTTP (hyper), each
//! export bounded by `otlp.timeout`. A failed export drops its spans and counts them in
//! `sluice_trace_spans_dropped_total{reason="export_failed"}`; the call path never waits on
//! it (`trace.rs` queues without blocking).

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use tracing::{info, warn};

use super::metrics::metrics;
use super::trace::{AttemptSpan, FinishedCall, Tracer};
use crate::config::{OtlpConfig, OtlpProtocol, TracingConfig};
use crate::wire::Code;

/// Calls per export request.
const BATCH_CALLS: usize = 512;
/// The longest a finished call waits for its batch to fill.
const BATCH_WAIT: Duration = Duration::from_secs(1);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the export thread and returns the tracer that feeds it.
pub fn start(config: &TracingConfig) -> Result<Tracer, BoxError> {
    let (queue, finished) = sync_channel(config.otlp.max_queue.max(1));
    let exporter = Exporter {
        resource: resource(&config.service_name),
        otlp: config.otlp.clone(),
        failing: false,
    };
    std::thread::Builder::new()
        .name("sluice-otlp".into())
        .spawn(move || exporter.run(finished))?;
    let dropped = metrics().trace_spans_dropped("queue_full");
    Ok(Tracer::new(config.sampling.ratio.0, queue, dropped))
}

struct Exporter {
    resource: Resource,
    otlp: OtlpConfig,
    /// The last export failed: the next success is logged.
    failing: bool,
}

impl Exporter {
    fn run(mut self, finished: Receiver<FinishedCall>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => return warn!(%error, "OTLP export cannot start; spans are dropped"),
        };
        let mut client = runtime.block_on(Client::new(&self.otlp));
        while let Some(batch) = next_batch(&finished) {
            let spans: Vec<Span> = batch.iter().flat_map(spans_of).collect();
            let count = spans.len() as u64;
            let request = self.request(spans);
            let timeout = self.otlp.timeout.0;
            let sent = runtime
                .block_on(async { tokio::time::timeout(timeout, client.export(request)).await });
            let sent = sent.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}").into()));
            self.account(sent, count);
        }
    }

    fn request(&self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        let scope = InstrumentationScope {
            name: "sluice".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// Counts an export, and logs when exports start or stop failing (not each failure).
    fn account(&mut self, sent: Result<(), BoxError>, spans: u64) {
        match sent {
            Ok(()) => {
                metrics().trace_spans_exported(spans);
                if std::mem::take(&mut self.failing) {
                    info!(endpoint = %self.otlp.endpoint.0, "OTLP export recovered");
                }
            }
            Err(error) => {
                metrics().trace_spans_dropped("export_failed").inc_by(spans);
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(endpoint = %self.otlp.endpoint.0, %error,
                        "OTLP export failing; spans are dropped until it recovers");
                }
            }
        }
    }
}

/// Waits for a finished call, then gathers more until the batch is full or `BATCH_WAIT` has
/// passed. `None` once the tracer is gone.
fn next_batch(finished: &Receiver<FinishedCall>) -> Option<Vec<FinishedCall>> {
    let first = finished.recv().ok()?;
    let until = Instant::now() + BATCH_WAIT;
    let mut batch = vec![first];
    while batch.len() < BATCH_CALLS {
        match finished.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(call) => batch.push(call),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(batch)
}

/// How spans reach the collector.
enum Client {
    Grpc(TraceServiceClient<tonic::transport::Channel>),
    Http {
        authority: String,
        sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    },
    /// The endpoint could not be set up; every export fails with this.
    Broken(String),
}

impl Client {
    async fn new(otlp: &OtlpConfig) -> Client {
        let endpoint = &otlp.endpoint.0;
        match otlp.protocol {
            OtlpProtocol::Grpc => match grpc_channel(otlp) {
                Ok(channel) => Client::Grpc(TraceServiceClient::new(channel)),
                Err(error) => Client::Broken(format!("{endpoint}: {error}")),
            },
            OtlpProtocol::Http => Client::Http {
                authority: endpoint.trim_start_matches("http://").to_string(),
                sender: None,
            },
        }
    }

    async fn export(&mut self, request: ExportTraceServiceRequest) -> Result<(), BoxError> {
        match self {
            Client::Grpc(client) => {
                client.export(request).await?;
                Ok(())
            }
            Client::Http { authority, sender } => http_export(authority, sender, request).await,
            Client::Broken(error) => Err(error.clone().into()),
        }
    }
}

/// A lazily connected channel: a collector that is down at start is not an error.
fn grpc_channel(otlp: &OtlpConfig) -> Result<tonic::transport::Channel, BoxError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(otlp.endpoint.0.clone())?
        .connect_timeout(otlp.timeout.0)
        .timeout(otlp.timeout.0);
    if otlp.endpoint.is_https() {
        let tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect_lazy())
}

/// POSTs the request as protobuf to `/v1/traces` on a kept HTTP/1.1 connection, opened
/// again when it has closed.
async fn http_export(
    authority: &str,
    sender: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    request: ExportTraceServiceRequest,
) -> Result<(), BoxError> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let stream = tokio::net::TcpStream::connect(authority).await?;
        let (send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        *sender = Some(send);
    }
    let Some(send) = sender.as_mut() else {
        return Err("no connection".into());
    };
    send.ready().await?;
    let post = http::Request::post("/v1/traces")
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(request.encode_to_vec())))?;
    let answer = send.send_request(post).await?;
    match answer.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("the collector answered HTTP {status}").into()),
    }
}

fn resource(service_name: &str) -> Resource {
    Resource {
        attributes: vec![
            text("service.name", service_name),
            text("service.version", env!("CARGO_PKG_VERSION")),
        ],
        ..Default::default()
    }
}

/// A finished call's server span, then one client span per attempt.
fn spans_of(call: &FinishedCall) -> Vec<Span> {
    let trace = &call.trace;
    let name = call.path.trim_start_matches('/').to_string();
    let (service, method) = name.split_once('/').unwrap_or((&name, ""));
    let rpc = [
        text("rpc.system", "grpc"),
        text("rpc.service", service),
        text("rpc.method", method),
    ];
    let mut attributes = rpc.to_vec();
    attributes.push(int("rpc.grpc.status_code", call.code as i64));
    attributes.push(text("sluice.origin", call.origin.label()));
    attributes.push(text("sluice.listener", &call.listener));
    attributes.push(int("sluice.attempts", trace.attempts.len() as i64));
    if let Some(cluster) = &call.cluster {
        attributes.push(text("sluice.cluster", cluster));
    }
    if let Some(peer) = call.peer {
        attributes.push(text("client.address", &peer.ip().to_string()));
        attributes.push(int("client.port", i64::from(peer.port())));
    }
    if let Some(rejected) = call.rejected {
        attributes.push(text("sluice.rejected", rejected));
    }
    let server = Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: trace.span_id.to_vec(),
        parent_span_id: trace.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(trace.sampled),
        name: name.clone(),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: trace.started_unix_ns,
        end_time_unix_nano: trace.unix_ns(call.ended),
        attributes,
        status: Some(status(call.code, server_error(call.code))),
        ..Default::default()
    };
    let mut spans = vec![server];
    for (number, attempt) in trace.attempts.iter().enumerate() {
        spans.push(attempt_span(call, attempt, number + 1, &rpc, &name));
    }
    spans
}

fn attempt_span(
    call: &FinishedCall,
    attempt: &AttemptSpan,
    number: usize,
    rpc: &[KeyValue],
    name: &str,
) -> Span {
    let trace = &call.trace;
    let code = attempt.code.unwrap_or(Code::Cancelled);
    let mut attributes = rpc.to_vec();
    let (host, port) = attempt
        .backend
        .rsplit_once(':')
        .unwrap_or((&attempt.backend, ""));
    attributes.push(text("server.address", host.trim_matches(['[', ']'])));
    if let Ok(port) = port.parse::<i64>() {
        attributes.push(int("server.port", port));
    }
    attributes.push(int("rpc.grpc.status_code", code as i64));
    attributes.push(text("sluice.attempt.kind", attempt.kind.label()));
    attributes.push(int("sluice.attempt.number", number as i64));
    let queue_ms = attempt.queue_wait.as_secs_f64() * 1000.0;
    attributes.push(attribute(
        "sluice.queue_wait_ms",
        Value::DoubleValue(queue_ms),
    ));
    if attempt.cancelled_by_hedge {
        attributes.push(attribute("sluice.hedge.lost", Value::BoolValue(true)));
    }
    let failed = code != Code::Ok && !attempt.cancelled_by_hedge;
    Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: attempt.span_id.to_vec(),
        parent_span_id: trace.span_id.to_vec(),
        flags: u32::from(trace.sampled),
        name: name.to_string(),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: trace.unix_ns(attempt.started),
        end_time_unix_nano: trace.unix_ns(attempt.ended.unwrap_or(call.ended)),
        attributes,
        status: Some(status(code, failed)),
        ..Default::default()
    }
}

/// The codes OpenTelemetry's RPC conventions call a server span's error.
fn server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn status(code: Code, error: bool) -> Status {
    match error {
        true => Status {
            code: StatusCode::Error as i32,
            message: code.go_name().to_string(),
        },
        false => Status::default(),
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    attribute(key, Value::StringValue(value.into()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attribute(key, Value::IntValue(value))
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}
