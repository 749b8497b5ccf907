//! One call's life: accept the stream, route it, pick a backend, lend an upstream stream,
//! forward both ways, and answer with a gRPC status when the proxy itself must.
//!
//! Each downstream connection is an `h2::server` connection driven by its own task; each
//! accepted stream gets one task ([`Proxy::serve_call`]) that runs the whole call, both
//! directions included, so a call costs one spawn.

pub mod coalesce;
pub mod forward;
pub mod grpc;
pub mod pool;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep_until, Instant};
use tracing::debug;

use crate::access_log::{self, AccessLog, Entry};
use crate::balance::{Backend, Cluster};
use crate::config::{Config, RouteMatch};
use crate::metrics::{unrouted, Origin, Reject};
use crate::server::Lifecycle;
use coalesce::CoalescingIo;
use forward::{PipeError, Replay, Seen};
use grpc::{Code, GrpcPath, ProxyStatus};
use pool::ConnectError;

/// HTTP/2 settings for both sides. Windows are larger than the 64 KiB default so one stream
/// can move a 16 MiB message at loopback speed; receive capacity is released only as bytes
/// are forwarded (forward.rs), so memory stays bounded by these windows.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS we advertise to clients.
    pub max_concurrent_streams: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_frame_size: 16 * 1024,
            max_concurrent_streams: 10_000,
        }
    }
}

/// How long a new connection may take to send its first bytes.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

// === Router ===

/// The clusters, and the routes to them in config order (first match wins). Swapped whole on
/// reload.
#[derive(Debug)]
pub struct Router {
    routes: Vec<(Option<RouteMatch>, Arc<Cluster>)>,
    clusters: Vec<Arc<Cluster>>,
}

impl Router {
    pub fn new(config: &Config, clusters: Vec<Arc<Cluster>>) -> Router {
        let by_name = |name: &str| clusters.iter().find(|c| c.name == name).cloned();
        let routes = match &config.routes {
            Some(routes) => routes
                .iter()
                // Validation guarantees every route names a cluster.
                .filter_map(|r| Some((r.match_.clone(), by_name(&r.cluster)?)))
                .collect(),
            None => clusters.iter().map(|c| (None, Arc::clone(c))).collect(),
        };
        Router { routes, clusters }
    }

    /// No clusters, no routes: every call is UNIMPLEMENTED (tests, and before a config).
    pub fn empty() -> Router {
        Router {
            routes: Vec::new(),
            clusters: Vec::new(),
        }
    }

    pub fn clusters(&self) -> &[Arc<Cluster>] {
        &self.clusters
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn route(&self, path: &str) -> Option<&Arc<Cluster>> {
        self.routes.iter().find_map(|(m, cluster)| {
            let hit = match m {
                None => true,
                Some(RouteMatch {
                    service: Some(service),
                    ..
                }) => GrpcPath::parse(path).is_some_and(|p| p.service == service),
                Some(RouteMatch {
                    prefix: Some(prefix),
                    ..
                }) => path.starts_with(prefix.as_str()),
                Some(_) => false,
            };
            hit.then_some(cluster)
        })
    }
}

// === Proxy ===

/// The data plane of one listener, hosted by pingora as a [`ServerApp`].
pub struct Proxy {
    pub listener: String,
    pub router: Arc<ArcSwap<Router>>,
    pub lifecycle: Arc<Lifecycle>,
    pub h2: H2Settings,
    pub access_log: Option<AccessLog>,
    /// `sluice_downstream_connections{listener}`, resolved once.
    pub connections_gauge: prometheus::IntGauge,
}

#[async_trait]
impl ServerApp for Proxy {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        self.serve_connection(io, shutdown.clone()).await;
        // An HTTP/2 connection is never handed back for reuse: it lived its whole life here.
        None
    }
}

impl Proxy {
    /// Serves one downstream connection until it closes. On drain (SIGTERM, or pingora's own
    /// shutdown during an upgrade) it sends GOAWAY and keeps serving the streams in flight.
    async fn serve_connection(self: &Arc<Self>, mut io: Stream, mut shutdown: ShutdownWatch) {
        let _open = self.lifecycle.connection_opened();
        self.connections_gauge.inc();
        let _gauge = scopeguard(&self.connections_gauge);
        let peer = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
        // Anything but the HTTP/2 preface is a client speaking HTTP/1: tell it plainly.
        let mut first = [0u8; 4];
        match tokio::time::timeout(PREFACE_TIMEOUT, io.try_peek(&mut first)).await {
            Ok(Ok(true)) if &first != b"PRI " => {
                reply_not_http2(&mut io).await;
                return;
            }
            Ok(Ok(_)) => {}
            // Closed or silent before sending anything: nothing to answer.
            Ok(Err(_)) | Err(_) => return,
        }
        // Calls in flight on this connection: write coalescing waits only when there are
        // several (coalesce.rs).
        let streams = Arc::new(AtomicUsize::new(0));
        let handshake = h2::server::Builder::new()
            .initial_window_size(self.h2.stream_window)
            .initial_connection_window_size(self.h2.connection_window)
            .max_frame_size(self.h2.max_frame_size)
            .max_concurrent_streams(self.h2.max_concurrent_streams)
            .handshake::<_, Bytes>(CoalescingIo::new(io, Arc::clone(&streams)));
        let mut connection = match handshake.await {
            Ok(connection) => connection,
            Err(error) => {
                // A bad client, not a proxy fault: debug only, the accept loop goes on.
                debug!(%error, listener = %self.listener, "downstream handshake failed");
                return;
            }
        };
        let mut draining = self.lifecycle.draining();
        let mut goaway_sent = false;
        loop {
            tokio::select! {
                // Ends when the client closes, the connection fails, or (after GOAWAY) the
                // last stream finishes.
                next = connection.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let proxy = Arc::clone(self);
                        let open = StreamCount::open(&streams);
                        // Boxed: tokio copies a task's future when it spawns and finishes it
                        // (7 memcpys); a call's state machine is kilobytes, a box is a pointer.
                        tokio::spawn(Box::pin(async move {
                            proxy.serve_call(request, respond, peer).await;
                            drop(open);
                        }));
                    }
                    Some(Err(error)) => {
                        debug!(%error, listener = %self.listener, "downstream connection error");
                        break;
                    }
                    None => break,
                },
                // Fires once, when draining starts.
                _ = async {
                    tokio::select! {
                        _ = draining.wait_for(|d| *d) => {}
                        _ = shutdown.wait_for(|s| *s) => {}
                    }
                }, if !goaway_sent => {
                    connection.graceful_shutdown();
                    goaway_sent = true;
                }
            }
        }
    }

    /// Runs one gRPC call from its request headers to its last frame, then counts it and
    /// writes its access log line.
    async fn serve_call(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: Option<SocketAddr>,
    ) {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        if parts.method != Method::POST
            || !grpc::is_grpc_content_type(parts.headers.get(http::header::CONTENT_TYPE))
        {
            reply_not_grpc(&mut respond, &parts);
            return;
        }
        // Read or made before the first attempt, so a generated x-request-id goes upstream.
        let trace_id = match &self.access_log {
            Some(_) => access_log::trace_id(&mut parts.headers),
            None => String::new(),
        };
        let router = self.router.load();
        let Some(cluster) = router.route(parts.uri.path()) else {
            let message = format!("sluice: no route for {}", parts.uri.path());
            reply(&mut respond, ProxyStatus::new(Code::Unimplemented, message));
            unrouted().rejected(Reject::NoRoute);
            let ending = Ending::proxy(Code::Unimplemented);
            let method = unrouted().method(parts.uri.path());
            method.record(ending.code, ending.origin, started.elapsed());
            let summary = Summary::default();
            self.log(&parts, None, &summary, ending, started, peer, &trace_id);
            return;
        };
        // Not the router guard: it is not meant to be held for a call's whole life.
        let cluster = Arc::clone(cluster);
        drop(router);
        let method = cluster.stats.method(parts.uri.path());
        // The effective deadline: the client's grpc-timeout, capped by max_deadline, which
        // also applies when the client sent none.
        let budget = match parts.headers.get("grpc-timeout") {
            None => Ok(cluster.settings.max_deadline),
            Some(value) => match grpc::parse_timeout(value.as_bytes()) {
                Some(timeout) => Ok(timeout.min(cluster.settings.max_deadline)),
                None => Err(format!("sluice: malformed grpc-timeout {value:?}")),
            },
        };
        let (ending, summary, parts) = match budget {
            Err(message) => {
                reply(&mut respond, ProxyStatus::new(Code::Internal, message));
                (Ending::proxy(Code::Internal), Summary::default(), parts)
            }
            Ok(budget) => {
                let mut call = Call {
                    cluster: Arc::clone(&cluster),
                    h2: self.h2,
                    deadline: started + budget,
                    request: parts,
                    body,
                    respond,
                    bytes_in: AtomicU64::new(0),
                    summary: Summary::default(),
                };
                let ending = call.run().await;
                (ending, call.summary, call.request)
            }
        };
        method.record(ending.code, ending.origin, started.elapsed());
        self.log(
            &parts,
            Some(&cluster),
            &summary,
            ending,
            started,
            peer,
            &trace_id,
        );
    }

    /// Writes the call's access log line, when the log is on.
    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        request: &http::request::Parts,
        cluster: Option<&Arc<Cluster>>,
        summary: &Summary,
        ending: Ending,
        started: Instant,
        peer: Option<SocketAddr>,
        trace_id: &str,
    ) {
        let Some(log) = &self.access_log else { return };
        log.write(&Entry {
            time: access_log::now_rfc3339(),
            listener: &self.listener,
            peer,
            path: request.uri.path(),
            cluster: cluster.map(|c| c.name.as_str()),
            backend: summary.backend.as_ref().map(|b| b.address.0.as_str()),
            attempts: summary.attempts,
            grpc_status: ending.code as u32,
            grpc_code: ending.code.go_name(),
            origin: match ending.origin {
                Origin::Upstream => "upstream",
                Origin::Proxy => "proxy",
            },
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: summary.bytes_in,
            bytes_out: summary.bytes_out,
            trace_id,
        });
    }
}

/// Decrements a gauge when dropped (a connection's `sluice_downstream_connections`).
fn scopeguard(gauge: &prometheus::IntGauge) -> impl Drop + '_ {
    struct Guard<'a>(&'a prometheus::IntGauge);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Guard(gauge)
}

/// One call counted in its connection's stream count, until dropped.
struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    fn open(streams: &Arc<AtomicUsize>) -> StreamCount {
        streams.fetch_add(1, Ordering::Relaxed);
        StreamCount(Arc::clone(streams))
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === Call ===

/// One call in flight: the downstream stream and what an attempt needs to reach a backend.
struct Call {
    cluster: Arc<Cluster>,
    h2: H2Settings,
    deadline: Instant,
    /// Kept whole so a retry can resend the headers.
    request: http::request::Parts,
    body: RecvStream,
    respond: SendResponse<Bytes>,
    /// Request DATA bytes read from the client (the upload counts them as they pass).
    bytes_in: AtomicU64,
    summary: Summary,
}

/// What the access log needs of a finished call besides its status.
#[derive(Debug, Default)]
struct Summary {
    attempts: u32,
    /// The backend of the last attempt.
    backend: Option<Arc<Backend>>,
    bytes_in: u64,
    bytes_out: u64,
}

/// How a call ended: its gRPC status and who decided it.
#[derive(Debug, Clone, Copy)]
struct Ending {
    code: Code,
    origin: Origin,
}

impl Ending {
    fn proxy(code: Code) -> Ending {
        Ending {
            code,
            origin: Origin::Proxy,
        }
    }

    fn upstream(code: Code) -> Ending {
        Ending {
            code,
            origin: Origin::Upstream,
        }
    }
}

/// How one attempt ended.
enum Attempt {
    /// The response went to the client, or the call ended in a way already handled.
    Done(Ending),
    /// The request never reached the backend's application: another backend may take it.
    Retry(RetryReason),
}

#[derive(Debug, thiserror::Error)]
enum RetryReason {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("backend {0} refused the stream (REFUSED_STREAM)")]
    Refused(String),
    #[error("backend {0} sent GOAWAY before processing the stream")]
    GoAway(String),
}

/// What the attempt's wait loops saw, acted on once the futures borrowing the streams end.
enum Outcome {
    /// The response, trailers included, reached the client, with this status.
    Finished(Code),
    Retry(RetryReason),
    /// The client reset the stream or went away: reset upstream with the same reason.
    ClientGone(Reason),
    /// The deadline passed (before or after the response headers went out).
    DeadlineExceeded,
    /// The backend failed before its response headers: answer with this status.
    FailedBeforeHeaders(ProxyStatus),
    /// The backend reset the stream after its response headers: pass the reset on.
    UpstreamReset(Reason),
    /// The backend's connection broke after its response headers.
    UpstreamLost(String),
}

impl Call {
    async fn run(&mut self) -> Ending {
        let ending = self.attempts().await;
        self.summary.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        ending
    }

    async fn attempts(&mut self) -> Ending {
        self.cluster.retry_budget.on_request();
        let stats = Arc::clone(&self.cluster.stats);
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let mut replay = Replay::default();
        loop {
            if Instant::now() >= self.deadline {
                let message = "sluice: deadline exceeded before the call reached a backend";
                reply(&mut self.respond, ProxyStatus::deadline_exceeded(message));
                stats.rejected(Reject::Deadline);
                return Ending::proxy(Code::DeadlineExceeded);
            }
            let Some(backend) = self.cluster.pick(&tried) else {
                let message = format!("sluice: cluster {} has no backends", self.cluster.name);
                reply(&mut self.respond, ProxyStatus::unavailable(message));
                stats.rejected(Reject::NoBackend);
                return Ending::proxy(Code::Unavailable);
            };
            tried.push(Arc::clone(&backend));
            self.summary.attempts = tried.len() as u32;
            self.summary.backend = Some(Arc::clone(&backend));
            let reason = match self.attempt(&backend, &mut replay).await {
                Attempt::Done(ending) => return ending,
                Attempt::Retry(reason) => reason,
            };
            let attempts = tried.len() as u32;
            let can_retry = attempts < self.cluster.settings.max_attempts
                && replay.is_complete()
                && Instant::now() < self.deadline;
            if can_retry && self.cluster.retry_budget.try_withdraw() {
                debug!(%reason, attempt = attempts, "retrying on another backend");
                stats.retried();
                continue;
            }
            if Instant::now() >= self.deadline {
                let message = format!("sluice: deadline exceeded after {reason}");
                reply(&mut self.respond, ProxyStatus::deadline_exceeded(message));
                stats.rejected(Reject::Deadline);
                return Ending::proxy(Code::DeadlineExceeded);
            } else if let RetryReason::Refused(_) = reason {
                // gRPC clients retry REFUSED_STREAM on their own: pass it through unchanged.
                self.respond.send_reset(Reason::REFUSED_STREAM);
                return Ending::upstream(Code::Unavailable);
            } else {
                let message = format!("sluice: {reason} (after {attempts} attempts)");
                reply(&mut self.respond, ProxyStatus::unavailable(message));
                stats.rejected(Reject::NoBackend);
                return Ending::proxy(Code::Unavailable);
            }
        }
    }

    /// Sends the call to one backend and forwards it to the end, unless it must be retried.
    async fn attempt(&mut self, backend: &Arc<Backend>, replay: &mut Replay) -> Attempt {
        let settings = &self.cluster.settings;
        let picked_at = Instant::now();
        // Only attempts whose request went out are recorded on the backend (SPEC: "one per
        // attempt sent to a backend"); a failed connect counts through its backoff instead.
        let finish = |code: Code| backend.finish_attempt(code, picked_at.elapsed());
        let in_flight = backend.start_stream();
        // One timer for the whole attempt: connecting, waiting, streaming.
        let mut deadline = pin!(sleep_until(self.deadline));

        // Lend a ready stream on a pooled connection, bounded by the deadline; the client may
        // leave meanwhile. `ready` waits only if h2 counts the peer's stream limit lower than
        // we do (before its SETTINGS arrive).
        let lend = async {
            let (sender, slot) = backend
                .pool
                .acquire(&backend.address.0, settings.connect_timeout, &self.h2)
                .await
                .inspect_err(|_| backend.record_connect_failure())?;
            backend.record_connect_success();
            match sender.ready().await {
                Ok(sender) => Ok((sender, slot)),
                Err(_) => {
                    slot.mark_broken();
                    Err(RetryReason::GoAway(backend.address.to_string()))
                }
            }
        };
        let lent = tokio::select! {
            // The deadline first: when it and a connect timeout fire together, the deadline
            // is the answer.
            biased;
            _ = &mut deadline => {
                let message = format!(
                    "sluice: deadline exceeded while connecting to backend {}",
                    backend.address
                );
                reply(&mut self.respond, ProxyStatus::deadline_exceeded(message));
                self.cluster.stats.rejected(Reject::Deadline);
                return Attempt::Done(Ending::proxy(Code::DeadlineExceeded));
            }
            reset = poll_fn(|cx| self.respond.poll_reset(cx)) => {
                debug!(reason = ?reset.ok(), "client left while connecting");
                return Attempt::Done(Ending::proxy(Code::Cancelled));
            }
            lent = lend => lent,
        };
        let (mut sender, slot) = match lent {
            Ok(lent) => lent,
            Err(reason) => return Attempt::Retry(reason),
        };

        // The upstream request: the same headers, and the remaining budget as grpc-timeout.
        // Hop-by-hop headers (connection, upgrade, te other than trailers, ...) need no
        // stripping: h2 rejects a header block that carries them as malformed before we see
        // it (h2 frame/headers.rs, load_hpack), in requests and responses alike.
        let mut upstream = Request::from_parts(self.request.clone(), ());
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        upstream
            .headers_mut()
            .insert("grpc-timeout", grpc::encode_timeout(remaining));
        // Ended only if no earlier attempt read part of the body: that part is replayed first.
        let request_ended = replay.is_empty() && self.body.is_end_stream();
        // Latency is measured from here: connect time is not the backend's slowness.
        let sent_at = Instant::now();
        let (response, mut up_send) = match sender.send_request(upstream, request_ended) {
            Ok(sent) => sent,
            Err(error) => {
                slot.mark_broken();
                debug!(%error, backend = %backend.address, "send_request failed");
                return Attempt::Retry(RetryReason::GoAway(backend.address.to_string()));
            }
        };

        let answered = AtomicBool::new(false);
        let mut down_send: Option<SendStream<Bytes>> = None;
        let outcome = {
            let mut upload = pin!(forward::upload(
                &mut self.body,
                &mut up_send,
                replay,
                &answered,
                &self.bytes_in,
            ));
            let mut upload_done = request_ended;
            let mut response = pin!(response);

            // Phase 1: until the backend's response headers.
            let response = loop {
                tokio::select! {
                    biased;
                    reset = poll_fn(|cx| self.respond.poll_reset(cx)) => {
                        break Err(Outcome::ClientGone(reset.unwrap_or(Reason::CANCEL)));
                    }
                    _ = &mut deadline => break Err(Outcome::DeadlineExceeded),
                    result = &mut upload, if !upload_done => {
                        upload_done = true;
                        if let Some(outcome) = upload_ended(result) {
                            break Err(outcome);
                        }
                    }
                    result = &mut response => break Ok(result),
                }
            };
            match response {
                Err(outcome) => outcome,
                Ok(Err(error)) => classify_before_headers(&error, backend, &slot),
                Ok(Ok(response)) => {
                    answered.store(true, Ordering::Relaxed);
                    backend.observe_latency(sent_at.elapsed());
                    let (parts, mut up_recv) = response.into_parts();
                    let trailers_only = up_recv.is_end_stream();
                    let status = trailers_only.then(|| Code::of_headers(&parts.headers));
                    let head = Response::from_parts(parts, ());
                    match (self.respond.send_response(head, trailers_only), status) {
                        (Err(error), _) => Outcome::ClientGone(client_reason(&error)),
                        (Ok(_), Some(status)) => Outcome::Finished(status),
                        (Ok(stream), None) => {
                            let down = down_send.insert(stream);
                            let mut status = None;
                            let mut sent = 0;
                            // Phase 2: stream the response; the upload goes on beside it.
                            let outcome = {
                                let mut download =
                                    pin!(forward::pipe(&mut up_recv, down, |seen| {
                                        match seen {
                                            Seen::Data(chunk) => sent += chunk.len() as u64,
                                            Seen::Trailers(t) => status = Some(Code::of_headers(t)),
                                        }
                                    }));
                                loop {
                                    tokio::select! {
                                        biased;
                                        _ = &mut deadline => break Outcome::DeadlineExceeded,
                                        result = &mut upload, if !upload_done => {
                                            upload_done = true;
                                            if let Some(outcome) = upload_ended(result) {
                                                break outcome;
                                            }
                                        }
                                        result = &mut download => break match result {
                                            // The status comes with the trailers, read below.
                                            Ok(_) => Outcome::Finished(Code::Unknown),
                                            Err(PipeError::Sink(reason)) => Outcome::ClientGone(reason),
                                            Err(PipeError::Source(error)) if error.is_reset() => {
                                                Outcome::UpstreamReset(
                                                    error.reason().unwrap_or(Reason::CANCEL),
                                                )
                                            }
                                            Err(PipeError::Source(error)) => {
                                                Outcome::UpstreamLost(error.to_string())
                                            }
                                        },
                                    }
                                }
                            };
                            self.summary.bytes_out += sent;
                            match outcome {
                                // No trailers (END_STREAM on DATA): gRPC clients see Unknown
                                // or Internal; Unknown is what the backend left unsaid.
                                Outcome::Finished(_) => {
                                    Outcome::Finished(status.unwrap_or(Code::Unknown))
                                }
                                other => other,
                            }
                        }
                    }
                }
            }
        };

        drop(in_flight);
        let ending = match outcome {
            Outcome::Finished(code) => Ending::upstream(code),
            Outcome::Retry(reason) => {
                finish(Code::Unavailable);
                return Attempt::Retry(reason);
            }
            Outcome::ClientGone(reason) => {
                debug!(?reason, backend = %backend.address, "client reset; resetting upstream");
                up_send.send_reset(reason);
                Ending::proxy(Code::Cancelled)
            }
            Outcome::DeadlineExceeded => {
                // The backend must stop working on a call nobody waits for.
                up_send.send_reset(Reason::CANCEL);
                let status = ProxyStatus::deadline_exceeded(format!(
                    "sluice: deadline exceeded while backend {} was working",
                    backend.address
                ));
                // After response headers the status can only travel in trailers.
                match down_send.as_mut() {
                    Some(down) => {
                        let _ = down.send_trailers(status.to_trailers());
                    }
                    None => reply(&mut self.respond, status),
                }
                Ending::proxy(Code::DeadlineExceeded)
            }
            Outcome::FailedBeforeHeaders(status) => {
                let code = status.code;
                reply(&mut self.respond, status);
                Ending::proxy(code)
            }
            Outcome::UpstreamReset(reason) => {
                if let Some(down) = down_send.as_mut() {
                    down.send_reset(reason);
                }
                Ending::upstream(Code::of_reset(reason))
            }
            Outcome::UpstreamLost(error) => {
                slot.mark_broken();
                if let Some(down) = down_send.as_mut() {
                    let status = ProxyStatus::unavailable(format!(
                        "sluice: connection to backend {} lost: {error}",
                        backend.address
                    ));
                    let _ = down.send_trailers(status.to_trailers());
                }
                Ending::proxy(Code::Unavailable)
            }
        };
        finish(ending.code);
        Attempt::Done(ending)
    }
}

/// What the end of the upload means for the attempt: the client leaving ends it; a finished
/// upload does not, and neither does an upstream failure, which shows on the response too.
fn upload_ended(result: Result<(), PipeError>) -> Option<Outcome> {
    match result {
        Err(PipeError::Source(error)) => Some(Outcome::ClientGone(client_reason(&error))),
        Ok(()) | Err(PipeError::Sink(_)) => None,
    }
}

/// Sorts an upstream failure before any response header: retry what the backend cannot have
/// processed, answer UNAVAILABLE for the rest. Uses `is_reset()`, not `reason()`: a GOAWAY
/// error carries a reason too (design.md).
fn classify_before_headers(
    error: &h2::Error,
    backend: &Backend,
    slot: &pool::StreamSlot,
) -> Outcome {
    let address = backend.address.to_string();
    if error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM) {
        return Outcome::Retry(RetryReason::Refused(address));
    }
    // A graceful GOAWAY fails only the streams above its last-stream-id: unprocessed.
    if error.is_go_away() && error.is_remote() && error.reason() == Some(Reason::NO_ERROR) {
        slot.mark_broken();
        return Outcome::Retry(RetryReason::GoAway(address));
    }
    let message = if error.is_reset() {
        format!(
            "sluice: backend {address} reset the stream before replying ({:?})",
            error.reason().unwrap_or(Reason::INTERNAL_ERROR)
        )
    } else {
        slot.mark_broken();
        format!("sluice: connection to backend {address} failed: {error}")
    };
    Outcome::FailedBeforeHeaders(ProxyStatus::unavailable(message))
}

/// The reason to pass upstream when the client side failed: its reset reason, else CANCEL
/// (the client's connection went away).
fn client_reason(error: &h2::Error) -> Reason {
    if error.is_reset() {
        error.reason().unwrap_or(Reason::CANCEL)
    } else {
        Reason::CANCEL
    }
}

/// Answers with a proxy-made gRPC status, trailers-only.
fn reply(respond: &mut SendResponse<Bytes>, status: ProxyStatus) {
    debug!(code = ?status.code, message = %status.message, "proxy reply");
    // Fails only if the client already reset the stream: then nobody is waiting.
    let _ = respond.send_response(status.to_response(), true);
}

/// A request that is not gRPC (wrong method or content-type): a plain HTTP error that says so,
/// on this stream only.
fn reply_not_grpc(respond: &mut SendResponse<Bytes>, request: &http::request::Parts) {
    let (status, text) = if request.method != Method::POST {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "sluice: {} is not gRPC: gRPC calls use POST\n",
                request.method
            ),
        )
    } else {
        let content_type = request
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "none".into());
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "sluice: content-type {content_type:?} is not gRPC: expected application/grpc\n"
            ),
        )
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(mut stream) = respond.send_response(response, false) {
        let _ = stream.send_data(Bytes::from(text), true);
    }
}

/// An HTTP/1 client on a gRPC listener gets a readable answer instead of a dropped connection.
async fn reply_not_http2(io: &mut Stream) {
    const BODY: &str =
        "sluice: this port serves gRPC over HTTP/2 only (cleartext h2c with prior knowledge)\n";
    let response = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
    // Read what the client sent before closing: closing with unread bytes makes the kernel
    // send a RST, and the client may lose the answer. Bounded: 1 s and 64 KiB.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0;
        while total < 64 * 1024 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}
