//! OTLP export of finished calls' spans, on a thread of its own: batches of up to
//! `BATCH_CALLS` calls, sent at least once a second, over gRPC (tonic) or HTTP (hyper), each
//! export bounded by `otlp.timeout`. A failed export drops its spans and counts them in
//! `sluice_trace_spans_dropped_total{reason="export_failed"}`; the call path never waits on
//! it (`trace.rs` queues without blocking).

use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tracing::{info, warn};

use super::metrics::metrics;
use super::span_proto::export_request;
use super::trace::{FinishedCall, Tracer};
use crate::config::{OtlpConfig, OtlpProtocol, TracingConfig};

/// Calls per export request.
const BATCH_CALLS: usize = 512;
/// The longest a finished call waits for its batch to fill.
const BATCH_WAIT: Duration = Duration::from_secs(1);
/// How often the queue is looked at: `max_queue` calls must fit in what arrives meanwhile.
const POLL: Duration = Duration::from_millis(50);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the export thread and returns the tracer that feeds it.
pub fn start(config: &TracingConfig) -> Result<Tracer, BoxError> {
    let (queue, finished) = sync_channel(config.otlp.max_queue.max(1));
    let exporter = Exporter {
        service_name: config.service_name.clone(),
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
    service_name: String,
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
            let count: u64 = batch
                .iter()
                .map(|c| 1 + c.trace.attempts.len() as u64)
                .sum();
            let request = Bytes::from(export_request(&batch, &self.service_name));
            let timeout = self.otlp.timeout.0;
            let sent = runtime
                .block_on(async { tokio::time::timeout(timeout, client.export(request)).await });
            let sent = sent.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}").into()));
            self.account(sent, count);
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

/// Gathers finished calls until a batch is full or its first call has waited `BATCH_WAIT`.
/// The queue is looked at every `POLL`, never waited on: a wait would wake this thread for
/// each call that arrives, which cost more than encoding the call's spans. `None` once the
/// tracer is gone and nothing is left.
fn next_batch(finished: &Receiver<FinishedCall>) -> Option<Vec<FinishedCall>> {
    let mut batch = Vec::new();
    let mut first_at = None;
    loop {
        loop {
            match finished.try_recv() {
                Ok(call) => {
                    first_at.get_or_insert_with(Instant::now);
                    batch.push(call);
                    if batch.len() >= BATCH_CALLS {
                        return Some(batch);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return (!batch.is_empty()).then_some(batch),
            }
        }
        if first_at.is_some_and(|at: Instant| at.elapsed() >= BATCH_WAIT) {
            return Some(batch);
        }
        std::thread::sleep(POLL);
    }
}

/// How spans reach the collector.
enum Client {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
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
                Ok(channel) => Client::Grpc(tonic::client::Grpc::new(channel)),
                Err(error) => Client::Broken(format!("{endpoint}: {error}")),
            },
            OtlpProtocol::Http => Client::Http {
                authority: endpoint.trim_start_matches("http://").to_string(),
                sender: None,
            },
        }
    }

    async fn export(&mut self, request: Bytes) -> Result<(), BoxError> {
        match self {
            Client::Grpc(client) => {
                client.ready().await?;
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                client
                    .unary(tonic::Request::new(request), path, Encoded)
                    .await?;
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
    request: Bytes,
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
        .body(Full::new(request))?;
    let answer = send.send_request(post).await?;
    match answer.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("the collector answered HTTP {status}").into()),
    }
}

/// The OTLP/gRPC method that takes spans.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC codec for a request already encoded (`span_proto.rs`); the answer, an
/// `ExportTraceServiceResponse`, is read and ignored: its status says enough.
#[derive(Debug, Clone, Copy)]
struct Encoded;

impl Codec for Encoded {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Encoded {
        Encoded
    }
}

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Encoded {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
