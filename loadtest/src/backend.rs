//! `sluice-loadtest backend`: a tonic echo backend for the benchmark and the incident replay.
//!
//! It speaks sluice's `echo.v1.Echo`, names itself in the `x-backend-id` response header, and
//! can turn slow after a while. With `workers`, at most that many calls work at once and the rest
//! queue, as on a server with a fixed thread pool. With `leak`, a slow call keeps working after its
//! caller gave up, as the leaking machine of the incident did. A call that gets a worker after the
//! deadline its client set (the `x-deadline-unix-ms` header) is counted: work nobody waits for any
//! more. A call whose caller cancels while it queues never starts.
//!
//! How it fails, from `slow_after` on, is a [`Failure`]: slow, failing fast, hung, or
//! overloaded.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::echo_server::{Echo, EchoServer};
use crate::pb::{EchoRequest, EchoResponse};

/// The header a load client puts its absolute deadline in, milliseconds since the Unix epoch.
pub const DEADLINE_HEADER: &str = "x-deadline-unix-ms";

/// A `ServerStream` request with this message is held open, sending nothing, until the client
/// leaves (the idle-streams memory scenario).
pub const HOLD: &str = "hold";

/// How a backend fails once `slow_after` has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// Every call takes `slow_delay` more (with `leak` and `workers`, work piles up).
    #[default]
    Slow,
    /// Every call is answered UNAVAILABLE at once, as with a broken dependency.
    FailFast,
    /// The process is stopped: its connections freeze (nothing is read or written, not even
    /// HTTP/2 PINGs), while the kernel still accepts new ones.
    Hang,
    /// Its capacity falls below its share: `workers` calls at a time, each working
    /// `slow_delay`; the rest queue, and a call whose caller left while it queued never runs.
    Overload,
}

#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub id: String,
    /// Added to every call.
    pub delay: Duration,
    /// From this long after start, every call also takes `slow_delay`.
    pub slow_after: Option<Duration>,
    pub slow_delay: Duration,
    /// Slow calls run to the end even when their caller has gone.
    pub leak: bool,
    /// Calls working at once; the rest queue. `None`: no limit. (Until `slow_after` for
    /// `Overload` too: its workers are the failure.)
    pub workers: Option<usize>,
    pub failure: Failure,
    /// Every call's wait for a worker and its work run on a task of their own, so a queued
    /// call is worked on even after its caller has gone (a handler that never checks its
    /// context).
    pub detached: bool,
}

/// What the backend saw, split at the moment it turned slow.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub calls_before_slow: AtomicU64,
    pub calls_after_slow: AtomicU64,
    /// Calls that got a worker (or started at once, without workers), and of those, the ones
    /// that got it after their client's deadline had passed.
    pub work_started: AtomicU64,
    pub started_past_deadline: AtomicU64,
    /// Calls queued or working now, and the most there ever were.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

#[derive(Clone)]
pub struct LoadBackend {
    options: Arc<BackendOptions>,
    started: Instant,
    pub stats: Arc<BackendStats>,
    workers: Option<Arc<tokio::sync::Semaphore>>,
}

impl LoadBackend {
    pub fn new(options: BackendOptions) -> LoadBackend {
        LoadBackend {
            options: Arc::new(options.clone()),
            started: Instant::now(),
            stats: Arc::default(),
            workers: options
                .workers
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
        }
    }

    /// Hung: its connections freeze (see `Freezable`).
    fn is_hung(&self) -> bool {
        self.options.failure == Failure::Hang && self.is_failing()
    }

    /// The failure has begun.
    fn is_failing(&self) -> bool {
        self.options
            .slow_after
            .is_some_and(|after| self.started.elapsed() >= after)
    }

    /// Counts an arriving call; returns how long it must take, and its deadline if it has one,
    /// or the error a backend failing fast answers.
    fn arrived(&self, metadata: &MetadataMap) -> Result<(Duration, Option<u128>), Status> {
        let slow = self.is_failing();
        let counter = if slow {
            &self.stats.calls_after_slow
        } else {
            &self.stats.calls_before_slow
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if slow && self.options.failure == Failure::FailFast {
            return Err(Status::unavailable("dependency unavailable"));
        }
        let deadline = metadata
            .get(DEADLINE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u128>().ok());
        let delay = self.options.delay
            + if slow {
                self.options.slow_delay
            } else {
                Duration::ZERO
            };
        Ok((delay, deadline))
    }

    /// Queues for a worker, then works for `delay`: on a task of its own when `detached`, so
    /// the caller leaving stops nothing.
    async fn work(&self, timing: (Duration, Option<u128>)) {
        if self.options.detached {
            let this = self.clone();
            let _ = tokio::spawn(async move { this.work_here(timing).await }).await;
        } else {
            self.work_here(timing).await;
        }
    }

    /// Queues for a worker, then works for `delay`. A call that gets its worker after its
    /// deadline is counted. With `leak`, slow work runs on its own task, so it goes on (holding
    /// its worker) when the caller's request is dropped.
    async fn work_here(&self, (delay, deadline): (Duration, Option<u128>)) {
        let now = self.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        let guard = InFlightGuard(Arc::clone(&self.stats));
        let overloaded = self.options.failure == Failure::Overload;
        let permit = match &self.workers {
            Some(workers) if !overloaded || self.is_failing() => {
                Arc::clone(workers).acquire_owned().await.ok()
            }
            _ => None,
        };
        self.stats.work_started.fetch_add(1, Ordering::Relaxed);
        if deadline.is_some_and(|d| now_unix_ms() > d) {
            self.stats
                .started_past_deadline
                .fetch_add(1, Ordering::Relaxed);
        }
        if delay.is_zero() {
            return;
        }
        if self.options.leak && self.is_failing() && !overloaded {
            let _ = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                drop((permit, guard));
            })
            .await;
        } else {
            tokio::time::sleep(delay).await;
            drop((permit, guard));
        }
    }

    fn reply(&self, request: &EchoRequest) -> EchoResponse {
        EchoResponse {
            message: request.message.clone(),
            payload: request.payload.clone(),
            backend_id: self.options.id.clone(),
            ..Default::default()
        }
    }

    fn respond<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Ok(id) = MetadataValue::try_from(self.options.id.as_str()) {
            response.metadata_mut().insert("x-backend-id", id);
        }
        response
    }
}

/// One unit of in-flight work; counted down when the work ends or is dropped.
struct InFlightGuard(Arc<BackendStats>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn now_unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for LoadBackend {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let delay = self.arrived(request.metadata())?;
        self.work(delay).await;
        Ok(self.respond(self.reply(request.get_ref())))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let delay = self.arrived(request.metadata())?;
        let mut inbound = request.into_inner();
        let mut last = EchoRequest::default();
        let mut count = 0;
        while let Some(message) = inbound.next().await {
            last = message?;
            count += 1;
        }
        self.work(delay).await;
        let mut reply = self.reply(&last);
        reply.count = count;
        Ok(self.respond(reply))
    }

    type ServerStreamStream = ResponseStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let delay = self.arrived(request.metadata())?;
        let request = request.into_inner();
        if request.message == HOLD {
            // Open, silent, until the client goes.
            return Ok(self.respond(Box::pin(tokio_stream::pending()) as ResponseStream));
        }
        self.work(delay).await;
        let reply = self.reply(&request);
        let messages = request.repeat.max(1) as usize;
        let stream = tokio_stream::iter(std::iter::repeat_n(reply, messages).map(Ok));
        Ok(self.respond(Box::pin(stream) as ResponseStream))
    }

    type BidiStream = ResponseStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let delay = self.arrived(request.metadata())?;
        self.work(delay).await;
        let id = self.options.id.clone();
        let stream = request.into_inner().map(move |message| {
            message.map(|m| EchoResponse {
                message: m.message,
                payload: m.payload,
                backend_id: id.clone(),
                ..Default::default()
            })
        });
        Ok(self.respond(Box::pin(stream) as ResponseStream))
    }
}

/// One accepted connection, which freezes when its backend hangs: from then on reads and
/// writes stay pending and never wake, as a stopped process's socket looks from outside.
struct Freezable {
    tcp: TcpStream,
    backend: LoadBackend,
}

impl Freezable {
    fn poll_unless_hung<T>(
        self: Pin<&mut Self>,
        io: impl FnOnce(Pin<&mut TcpStream>) -> Poll<T>,
    ) -> Poll<T> {
        let this = self.get_mut();
        if this.backend.is_hung() {
            return Poll::Pending;
        }
        io(Pin::new(&mut this.tcp))
    }
}

impl AsyncRead for Freezable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.poll_unless_hung(|tcp| tcp.poll_read(cx, buf))
    }
}

impl AsyncWrite for Freezable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_unless_hung(|tcp| tcp.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_unless_hung(|tcp| tcp.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_unless_hung(|tcp| tcp.poll_shutdown(cx))
    }
}

impl Connected for Freezable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// Serves `backend` on 127.0.0.1:`port`, on a task of its own, for as long as the process
/// runs.
pub async fn start_on(port: u16, backend: LoadBackend) -> Result<(), String> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("backend port {port}: {e}"))?;
    tokio::spawn(async move {
        let _ = serve(listener, backend).await;
    });
    Ok(())
}

/// Serves `backend` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    backend: LoadBackend,
) -> Result<(), tonic::transport::Error> {
    let connections = backend.clone();
    // `Server::tcp_nodelay` covers only the sockets tonic accepts itself, not these: without
    // it, Nagle holds each response until the proxy's ACK of the previous one, which a proxy
    // that sends nothing back in between gets only with its next request.
    let incoming = TcpListenerStream::new(listener).map(move |accepted| {
        accepted.map(|tcp| {
            let _ = tcp.set_nodelay(true);
            Freezable {
                tcp,
                backend: connections.clone(),
            }
        })
    });
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .concurrency_limit_per_connection(100_000)
        .max_concurrent_streams(100_000)
        .add_service(
            EchoServer::new(backend)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        )
        .serve_with_incoming(incoming)
        .await
}
