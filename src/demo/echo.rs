//! The echo backend: `echo.v1.Echo` with knobs to play a slow, failing or overloaded backend.
//! It serves the integration tests (in-process), the demo, and `sluice echo-backend` (as its
//! own process, for tests that kill it).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status, Streaming};

use super::pb::echo_server::{Echo, EchoServer};
use super::pb::{EchoRequest, EchoResponse};
use super::PemPair;
use crate::BoxError;

/// Large enough for the 16 MiB messages the tests send through the proxy.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// What a backend saw, for tests to assert on.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Calls that reached a handler.
    pub calls: AtomicU64,
    /// Unary calls whose handler was dropped before it answered (the client cancelled, or a
    /// deadline passed).
    pub cancelled: AtomicU64,
    /// The `grpc-timeout` of the latest call, verbatim.
    pub last_grpc_timeout: Mutex<Option<String>>,
    /// Unary calls being handled now, and the most ever handled at once.
    pub active: AtomicU64,
    pub peak_active: AtomicU64,
    /// With a worker pool: calls that got a worker, and of those, the ones that got it after
    /// their caller's deadline (`grpc-timeout` at arrival) had passed: work nobody waits for.
    pub work_started: AtomicU64,
    pub work_started_late: AtomicU64,
    /// Woken whenever `calls` or `cancelled` changes.
    pub changed: Notify,
}

/// The echo service. `delay` is added to every call, to play a slow backend.
#[derive(Debug, Clone)]
pub struct EchoService {
    pub id: String,
    pub delay: Duration,
    /// A slow tail: this share of unary calls, drawn at random, waits this much longer.
    pub tail: Option<Tail>,
    /// Answer every unary call with this status, at once: a backend whose dependency broke.
    pub fail_all: Option<tonic::Code>,
    /// Unary calls wait for one of a few workers, then work (`sluice echo-backend --workers`).
    pub pool: Option<WorkerPool>,
    pub stats: Arc<EchoStats>,
}

/// A slow tail (`sluice echo-backend --tail-fraction --tail-delay`): a share of calls that
/// take longer, as a GC pause or a cache miss makes them.
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    pub fraction: f64,
    pub delay: Duration,
}

/// A bounded pool of workers, as a server with a fixed thread or connection pool has: calls
/// beyond `workers` queue for one, then work `work` each.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<tokio::sync::Semaphore>,
    work: Duration,
    /// Drop a queued call whose caller has gone, and skip one whose deadline passed while it
    /// queued, as a handler that checks its context does. Without it, every queued call is
    /// worked on, whoever still waits for it: a Go handler that waits on a small database
    /// pool without looking at its context.
    checks_context: bool,
}

impl WorkerPool {
    pub fn new(workers: usize, work: Duration, checks_context: bool) -> WorkerPool {
        WorkerPool {
            workers: Arc::new(tokio::sync::Semaphore::new(workers.max(1))),
            work,
            checks_context,
        }
    }

    /// Queues for a worker, then works; counts the work, and work started past `deadline`.
    /// Err: the deadline passed while it queued, and this pool checks its context.
    async fn run(
        self,
        stats: Arc<EchoStats>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), Status> {
        // The semaphore is never closed: an error here cannot happen.
        let _worker = self.workers.acquire_owned().await;
        let late = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if late && self.checks_context {
            return Err(Status::deadline_exceeded(
                "deadline passed while queued for a worker",
            ));
        }
        stats.work_started.fetch_add(1, Ordering::Relaxed);
        if late {
            stats.work_started_late.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(self.work).await;
        Ok(())
    }
}

impl EchoService {
    pub fn new(id: impl Into<String>) -> EchoService {
        EchoService {
            id: id.into(),
            delay: Duration::ZERO,
            tail: None,
            fail_all: None,
            pool: None,
            stats: Arc::default(),
        }
    }

    /// With a worker pool, waits for a worker and works; a pool that does not check its
    /// context works on its own task, so the work goes on after the caller has gone.
    async fn work(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(pool) = self.pool.clone() else {
            return Ok(());
        };
        let timeout = metadata.get("grpc-timeout").map(|v| v.as_bytes());
        let deadline = timeout
            .and_then(crate::wire::parse_timeout)
            .map(|t| tokio::time::Instant::now() + t);
        let stats = Arc::clone(&self.stats);
        if pool.checks_context {
            return pool.run(stats, deadline).await;
        }
        let detached = tokio::spawn(pool.run(stats, deadline));
        detached
            .await
            .unwrap_or_else(|e| Err(Status::internal(e.to_string())))
    }

    fn arrived(&self, metadata: &MetadataMap) -> String {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Ok(mut last) = self.stats.last_grpc_timeout.lock() {
            last.clone_from(&timeout);
        }
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.changed.notify_waiters();
        timeout.unwrap_or_default()
    }

    fn reply(&self, request: &EchoRequest, grpc_timeout: String, count: u32) -> EchoResponse {
        EchoResponse {
            message: request.message.clone(),
            payload: request.payload.clone(),
            backend_id: self.id.clone(),
            grpc_timeout,
            count,
        }
    }

    /// The response headers: `x-backend-id`, and every `x-*` request header echoed back
    /// (`-bin` ones included) so tests can check metadata both ways; the trace and retry
    /// headers come back as `x-echo-traceparent` and `x-echo-previous-attempts`.
    fn headers(&self, request: &MetadataMap) -> MetadataMap {
        let mut headers = MetadataMap::new();
        if let Ok(id) = MetadataValue::try_from(self.id.as_str()) {
            headers.insert("x-backend-id", id);
        }
        if let Some(value) = request.get("traceparent") {
            headers.insert("x-echo-traceparent", value.clone());
        }
        if let Some(value) = request.get("grpc-previous-rpc-attempts") {
            headers.insert("x-echo-previous-attempts", value.clone());
        }
        for entry in request.iter() {
            match entry {
                KeyAndValueRef::Ascii(key, value) if key.as_str().starts_with("x-") => {
                    headers.insert(key.clone(), value.clone());
                }
                KeyAndValueRef::Binary(key, value) if key.as_str().starts_with("x-") => {
                    headers.insert_bin(key.clone(), value.clone());
                }
                _ => {}
            }
        }
        headers
    }

    fn with_headers<T>(&self, request: &MetadataMap, message: T) -> Response<T> {
        let mut response = Response::new(message);
        *response.metadata_mut() = self.headers(request);
        response
    }
}

/// The `grpc-status-details-bin` of a failure: a `google.rpc.Status` with the same code and
/// message, as real services send it; gRPC-Web clients decode it and prefer its message.
pub fn status_details(code: i32, message: &str) -> Vec<u8> {
    let mut details = Vec::new();
    prost::encoding::int32::encode(1, &code, &mut details);
    prost::encoding::string::encode(2, &message.to_string(), &mut details);
    details
}

/// The status a request asks to fail with, with a custom trailer and details attached.
fn failure(request: &EchoRequest) -> Option<Status> {
    if request.fail_code == 0 {
        return None;
    }
    let mut trailers = MetadataMap::new();
    trailers.insert("x-trailer", MetadataValue::from_static("custom"));
    Some(Status::with_details_and_metadata(
        tonic::Code::from(request.fail_code),
        request.fail_message.clone(),
        status_details(request.fail_code, &request.fail_message).into(),
        trailers,
    ))
}

/// Counts a unary handler while it runs, and one dropped before it finished.
struct CancelGuard<'a> {
    stats: &'a EchoStats,
    finished: bool,
}

impl<'a> CancelGuard<'a> {
    fn new(stats: &'a EchoStats) -> CancelGuard<'a> {
        let active = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_active.fetch_max(active, Ordering::Relaxed);
        CancelGuard {
            stats,
            finished: false,
        }
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            self.stats.changed.notify_waiters();
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let timeout = self.arrived(request.metadata());
        let mut guard = CancelGuard::new(&self.stats);
        let body = request.get_ref();
        if let Some(code) = self.fail_all {
            guard.finished = true;
            return Err(Status::new(code, format!("{} fails every call", self.id)));
        }
        self.work(request.metadata()).await?;
        let tail = (self.tail).filter(|t| fastrand::f64() < t.fraction);
        let delay = self.delay + tail.map_or(Duration::ZERO, |t| t.delay);
        tokio::time::sleep(delay + Duration::from_millis(body.sleep_ms.into())).await;
        guard.finished = true;
        if let Some(status) = failure(body) {
            return Err(status);
        }
        let reply = self.reply(body, timeout, 1);
        Ok(self.with_headers(request.metadata(), reply))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let timeout = self.arrived(request.metadata());
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let mut count = 0;
        let mut last = EchoRequest::default();
        while let Some(message) = stream.next().await {
            last = message?;
            count += 1;
        }
        tokio::time::sleep(self.delay).await;
        let reply = self.reply(&last, timeout, count);
        Ok(self.with_headers(&metadata, reply))
    }

    type ServerStreamStream = ResponseStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let timeout = self.arrived(request.metadata());
        let body = request.get_ref().clone();
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let repeat = body.repeat.max(1);
            for i in 0..repeat {
                tokio::time::sleep(service.delay + Duration::from_millis(body.sleep_ms.into()))
                    .await;
                let reply = service.reply(&body, timeout.clone(), i + 1);
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
            // With fail_after_headers the status follows messages, so it travels in trailers.
            if let Some(status) = failure(&body) {
                let _ = tx.send(Err(status)).await;
            }
        });
        let stream: ResponseStream = Box::pin(ReceiverStream::new(rx));
        Ok(self.with_headers(request.metadata(), stream))
    }

    type BidiStream = ResponseStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let timeout = self.arrived(request.metadata());
        let metadata = request.metadata().clone();
        let mut incoming = request.into_inner();
        let service = self.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut count = 0;
            while let Some(message) = incoming.next().await {
                count += 1;
                let reply = message.map(|m| service.reply(&m, timeout.clone(), count));
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        let stream: ResponseStream = Box::pin(ReceiverStream::new(rx));
        Ok(self.with_headers(&metadata, stream))
    }
}

/// Serves the echo service and `grpc.health.v1.Health` (SERVING) on `listener` until the
/// future is dropped.
pub async fn serve_echo(listener: TcpListener, service: EchoService) -> Result<(), BoxError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<EchoServer<EchoService>>()
        .await;
    serve_echo_with(listener, service, Some(health_service), None).await
}

/// Serves the echo service, and `health` when given (tests toggle its status, or leave it out
/// to play a backend without a health service); over TLS when `tls` is given.
pub async fn serve_echo_with(
    listener: TcpListener,
    service: EchoService,
    health: Option<
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    >,
    tls: Option<ServerTlsConfig>,
) -> Result<(), BoxError> {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_optional_service(health)
        .add_service(
            EchoServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        // `serve_with_incoming` leaves Nagle on; small replies would wait ~40 ms on delayed ACKs.
        .serve_with_incoming(TcpListenerStream::new(listener).map(|accepted| {
            accepted.inspect(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        }))
        .await?;
    Ok(())
}

/// `sluice echo-backend`: one echo backend as its own process, over TLS with `tls`. With a
/// worker pool, it logs its work every 5 s.
pub fn run_echo_backend(
    listen: SocketAddr,
    id: String,
    (delay, tail): (Duration, Option<Tail>),
    pool: Option<WorkerPool>,
    tls: Option<PemPair>,
) -> Result<(), BoxError> {
    let tls = match tls {
        Some(pair) => Some(ServerTlsConfig::new().identity(pair.identity()?)),
        None => None,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        let scheme = if tls.is_some() { "TLS" } else { "cleartext" };
        tracing::info!(address = %listener.local_addr()?, %id, scheme, "echo backend listening");
        let mut service = EchoService::new(id);
        service.delay = delay;
        service.tail = tail;
        if pool.is_some() {
            tokio::spawn(report_work(Arc::clone(&service.stats)));
        }
        service.pool = pool;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<EchoServer<EchoService>>()
            .await;
        serve_echo_with(listener, service, Some(health_service), tls).await
    })
}

/// Logs a worker pool's work every 5 s, once it has started and while it changes.
async fn report_work(stats: Arc<EchoStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last = 0;
    loop {
        tick.tick().await;
        let started = stats.work_started.load(Ordering::Relaxed);
        if started != last {
            let late = stats.work_started_late.load(Ordering::Relaxed);
            let share = late as f64 * 100.0 / started.max(1) as f64;
            tracing::info!(
                work.started = started,
                work.late = late,
                "work started, and started after the caller's deadline ({share:.1}%)"
            );
            last = started;
        }
    }
}
