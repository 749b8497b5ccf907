//! One call's life: accept the stream, route it, pick a backend, lend an upstream stream,
//! forward both ways, and answer with a gRPC status when the proxy itself must.
//!
//! Each downstream connection is an `h2::server` connection driven by its own task
//! ([`Proxy::serve_connection`]); each accepted stream gets one task ([`Proxy::serve_call`])
//! that runs the whole call, both directions included, so a call costs one spawn. The stages
//! live in their own files: [`route`] (which cluster), `call` (deadline and attempts),
//! `attempt` (one backend: connect, send headers, wait for response headers, stream),
//! `outcome` (what an attempt's end means for client, backend and counters), [`forward`]
//! (piping with flow control) and `reply` (the proxy's own answers). The downstream
//! connection's own policy lives here too: [`listener_tls`] (the listener's TLS and the
//! client's identity) and [`ping_watch`] (the client PING policy).

mod attempt;
mod call;
mod client;
mod connection;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod hedge;
pub mod listener_tls;
mod outcome;
pub mod ping_watch;
mod queue;
pub mod rate_limit;
mod reply;
pub mod route;
pub mod web;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::balance::Cluster;
use crate::lifecycle::{Lifecycle, OpenConnection};
use crate::sync::lock;
use crate::telemetry::access_log::{self, AccessLog, Entry};
use crate::telemetry::metrics;
use crate::telemetry::trace::{CallTrace, FinishedCall, Tracer};
use crate::telemetry::HandshakeFailure;
use crate::telemetry::{request_id, unrouted, Reject};
use crate::transport::H2Settings;
use crate::wire::{self, Code, ProxyStatus};
use call::{Call, Downstream, Ending, Summary};
pub use connection::ConnectionPolicy;
use listener_tls::{ClientCert, ClientIdentity, ServerTls};
pub use route::Router;

/// How long a new connection may take to send its first bytes, and to finish its TLS
/// handshake.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS ClientHello (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The data plane of one listener, hosted by pingora as a [`ServerApp`].
pub struct Proxy {
    pub listener: String,
    pub router: Arc<ArcSwap<Router>>,
    pub lifecycle: Arc<Lifecycle>,
    pub h2: H2Settings,
    pub access_log: Option<AccessLog>,
    /// `tracing`: each call's spans, to the OTLP exporter.
    pub tracer: Option<Arc<Tracer>>,
    /// Add an `x-request-id` to calls that carry no trace id (`request_id.generate`).
    pub generate_request_id: bool,
    /// `sluice_downstream_connections{listener}`, resolved once.
    pub connections_gauge: prometheus::IntGauge,
    /// TLS on this listener (`listeners[].tls`); `None`: cleartext h2c.
    pub tls: Option<Arc<ServerTls>>,
    /// The header that carries the verified client identity upstream (`forward_client_cert`).
    pub forward_client_cert: Option<HeaderName>,
    /// Identity headers removed from every request on this listener, whatever the client
    /// sent: `x-forwarded-client-cert` and every listener's `forward_client_cert` header, so
    /// no listener lets a client forge an identity that another verifies.
    pub identity_headers: Arc<[HeaderName]>,
    /// Max age, idle timeout, PINGs (`listeners[]` keys).
    pub policy: ConnectionPolicy,
    /// `max_connections`: beyond it, a new connection is closed as soon as it is accepted.
    pub max_connections: Option<usize>,
    /// Connections open on this listener, and when reaching the limit was last logged.
    pub open: ConnectionCount,
    /// `grpc_web`: gRPC-Web is served here too, under this CORS policy.
    pub grpc_web: Option<web::Cors>,
}

/// The connections open on a listener, for `max_connections`.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    open: AtomicUsize,
    warned_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// One open connection in its listener's count, until dropped.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Proxy {
    /// Counts a new connection in, or refuses it at `max_connections` (logged once a minute,
    /// counted in `sluice_downstream_connections_refused_total`).
    fn admit(&self) -> Option<Counted<'_>> {
        let count = &self.open.open;
        let was = count.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(count);
        let Some(max) = self.max_connections.filter(|max| was >= *max) else {
            return Some(counted);
        };
        metrics().downstream_connection_refused(&self.listener);
        let mut warned = lock(&self.open.warned_at);
        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(listener = %self.listener, max_connections = max,
                "max_connections reached: new client connections are closed as they arrive");
            *warned = Some(std::time::Instant::now());
        }
        None
    }
}

/// Who is at the other end of a downstream connection.
#[derive(Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// Under mTLS: the client's verified certificate.
    pub cert: Option<ClientCert>,
    /// Its `forward_client_cert` header value, made once per connection.
    xfcc: Option<HeaderValue>,
    /// The connection in the process's count of open connections, until the connection and
    /// every call on it are done (`Lifecycle::drain` waits for it).
    _open: Option<OpenConnection>,
    /// The in-memory connection of one gRPC-Web call, and its format (the access log's
    /// `protocol`); `None` for every native connection.
    pub web: Option<web::Mode>,
}

impl Peer {
    /// The same client, for the in-memory connection that carries one gRPC-Web call.
    fn for_web(&self, mode: web::Mode) -> Peer {
        Peer {
            addr: self.addr,
            cert: self.cert.clone(),
            xfcc: self.xfcc.clone(),
            _open: None,
            web: Some(mode),
        }
    }
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
    /// Serves one downstream connection until it closes: the TLS handshake first on a TLS
    /// listener, else a check that the client speaks HTTP/2.
    async fn serve_connection(self: &Arc<Self>, mut io: Stream, shutdown: ShutdownWatch) {
        // The gauge goes up before the count and down after it, so a gauge at 0 means no
        // connection is counted against max_connections either.
        // Held by the peer, so by every call too: the connection counts as open (for a drain)
        // until its last call has written its access log line, not just until it closed.
        let open = self.lifecycle.connection_opened();
        self.connections_gauge.inc();
        let _gauge = GaugeGuard(&self.connections_gauge);
        let Some(_counted) = self.admit() else { return };
        let addr = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
        // One deadline for the first bytes, the TLS handshake and the HTTP/2 preface.
        let deadline = tokio::time::Instant::now() + PREFACE_TIMEOUT;
        let Some(tls) = &self.tls else {
            // Anything but the HTTP/2 preface is a client speaking HTTP/1: gRPC-Web where the
            // listener serves it, else told plainly that gRPC needs HTTP/2.
            let mut first = [0u8; 4];
            let http1 = match tokio::time::timeout_at(deadline, io.try_peek(&mut first)).await {
                Ok(Ok(true)) => &first != b"PRI ",
                Ok(Ok(false)) => false,
                // Closed or silent before sending anything: nothing to answer.
                Ok(Err(_)) | Err(_) => return,
            };
            let peer = Peer {
                addr,
                _open: Some(open),
                ..Peer::default()
            };
            return match (http1, &self.grpc_web) {
                (false, _) => self.serve_h2(io, Arc::new(peer), deadline, shutdown).await,
                (true, Some(_)) => self.serve_http1(io, Arc::new(peer), shutdown).await,
                (true, None) => reply::not_http2(&mut io).await,
            };
        };
        // A connection closed before its first byte is a TCP health check, not a failed
        // handshake; one that does not start with a TLS record speaks cleartext.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, io.try_peek(&mut first)).await {
            Ok(Ok(true)) if first[0] != TLS_HANDSHAKE_RECORD => {
                metrics().tls_handshake_failed(&self.listener, HandshakeFailure::NotTls);
                debug!(listener = %self.listener, peer = ?addr, "cleartext on a TLS listener");
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let handshake = tokio::time::timeout_at(deadline, tls.accept(io)).await;
        match handshake.unwrap_or(Err(HandshakeFailure::Timeout)) {
            Ok((stream, cert)) => {
                let peer = Peer {
                    _open: Some(open),
                    ..self.peer_with(addr, cert)
                };
                // ALPN offers http/1.1 only on a listener with grpc_web.
                let http1 = stream.get_ref().1.alpn_protocol() == Some(b"http/1.1");
                match http1 {
                    false => {
                        self.serve_h2(stream, Arc::new(peer), deadline, shutdown)
                            .await
                    }
                    true => self.serve_http1(stream, Arc::new(peer), shutdown).await,
                }
            }
            Err(failure) => {
                // A bad client, not a proxy fault: counted, and logged at debug only.
                metrics().tls_handshake_failed(&self.listener, failure);
                debug!(listener = %self.listener, peer = ?addr, reason = failure.label(),
                    "TLS handshake failed");
            }
        }
    }

    /// The peer of a TLS connection: its verified certificate (`None` without mTLS), and the
    /// identity header made from it once for all its calls.
    fn peer_with(&self, addr: Option<SocketAddr>, cert: ClientIdentity) -> Peer {
        let cert = match cert {
            ClientIdentity::None => None,
            ClientIdentity::Verified(cert) => Some(cert),
            ClientIdentity::Unreadable(error) => {
                // Verified by the CA, but not something sluice can describe: the call goes
                // on without an identity, and the operator learns why.
                warn!(listener = %self.listener, peer = ?addr, %error,
                    "client certificate verified but unreadable; no identity forwarded or logged");
                None
            }
        };
        let xfcc = match (&self.forward_client_cert, &cert) {
            (Some(_), Some(cert)) => HeaderValue::from_str(&cert.xfcc())
                .inspect_err(|_| {
                    warn!(listener = %self.listener, peer = ?addr,
                        "client certificate names make no valid header value; none forwarded");
                })
                .ok(),
            _ => None,
        };
        Peer {
            addr,
            cert,
            xfcc,
            _open: None,
            web: None,
        }
    }

    /// Runs one gRPC call from its request headers to its last frame, then counts it and
    /// writes its access log line; `open` counts it on its connection until then.
    ///
    /// Not an `async fn`: one copies its arguments into locals and keeps both for the call's
    /// whole life, and `down` is 272 bytes. An `async move` block uses what it captures in
    /// place.
    #[allow(clippy::manual_async_fn)]
    fn serve_call(
        self: Arc<Self>,
        mut down: Downstream,
        peer: Arc<Peer>,
        open: StreamCount,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            self.serve_call_in_place(&mut down, &peer).await;
            if down.web {
                // Boxed: gRPC-Web on HTTP/2 is the rare path, and its future (2,504 bytes)
                // would set the size of every call's (2,600 instead of 2,112 bytes, so
                // mimalloc's 3,072-byte class instead of the 2,560 one for each held call).
                Box::pin(self.serve_web_h2(&mut down, &peer)).await;
            }
            drop(open);
        }
    }

    async fn serve_call_in_place(&self, down: &mut Downstream, peer: &Peer) {
        let started = Instant::now();
        // What only the time before the first attempt needs lives in blocks: a local in scope
        // across the call's `await` takes room in every call's future for its whole life.
        let Some((cluster, call)) = self.prepare_call(down, peer, started) else {
            return;
        };
        let (ending, summary) = call.run(down, peer, started).await;
        if let Some(request) = down.request.as_deref() {
            self.ended(request, Some(&cluster), summary, ending, started, peer);
        }
    }

    /// Checks, prepares and routes the request, and builds its call; or answers it at once
    /// (not gRPC, no route, a malformed `grpc-timeout`), counts and logs it, and returns `None`.
    fn prepare_call(
        &self,
        down: &mut Downstream,
        peer: &Peer,
        started: Instant,
    ) -> Option<(Arc<Cluster>, Call)> {
        let parts = down.request.as_deref_mut()?;
        if parts.method != Method::POST
            || !wire::is_grpc_content_type(parts.headers.get(http::header::CONTENT_TYPE))
        {
            if self.grpc_web.is_some() && web::is_web_request(parts) {
                down.web = true;
                return None;
            }
            reply::not_grpc(&mut down.respond, parts);
            return None;
        }
        // The client's identity goes upstream only as sluice verified it.
        for header in self.identity_headers.iter() {
            parts.headers.remove(header);
        }
        if let (Some(header), Some(xfcc)) = (&self.forward_client_cert, &peer.xfcc) {
            parts.headers.insert(header.clone(), xfcc.clone());
        }
        // The call's trace: its client's, or a new one (sent upstream by each attempt).
        let trace = self.tracer.as_ref().map(|t| t.begin(&parts.headers));
        // Before the first attempt, so a generated id goes upstream. A traced call needs
        // none: each attempt carries a `traceparent`.
        if self.generate_request_id && trace.is_none() {
            request_id::ensure(&mut parts.headers);
        }
        // Not the router guard: it is not meant to be held for a call's whole life.
        let router = self.router.load();
        let Some(route) = router.route(parts.uri.path(), &parts.headers) else {
            drop(router);
            let message = format!("sluice: no route for {}", parts.uri.path());
            let at_once = AtOnce {
                cluster: None,
                method: &unrouted().method(parts.uri.path()),
                status: ProxyStatus::new(Code::Unimplemented, message),
                rejected: Some(Reject::NoRoute),
                trace,
            };
            self.answer_at_once(&mut down.respond, parts, at_once, started, peer);
            return None;
        };
        let cluster = Arc::clone(route.cluster(&parts.headers));
        let cluster_header = route.cluster_header.clone();
        let hedging = route.hedging.clone();
        let limited = (route.rate_limit.as_ref()).and_then(|limit| {
            let key = client::rate_key(limit.per, &cluster.settings.client_key, peer, parts);
            limit.take(key, started).err()
        });
        drop(router);
        let method = cluster.stats.method(parts.uri.path());
        let refused = match (limited, deadline_budget(parts, &cluster)) {
            (Some(pushback), _) => {
                let message = format!(
                    "sluice: rate limited; a token for this client is due in {}ms",
                    pushback.as_millis()
                );
                let status = ProxyStatus::resource_exhausted(message, pushback);
                (status, Some(Reject::RateLimited))
            }
            (None, Err(status)) => (status, None),
            (None, Ok(budget)) => {
                let deadline = started + budget;
                let mut call = Call::new(Arc::clone(&cluster), method, self.h2, deadline);
                call.keep_request = self.access_log.is_some() || trace.is_some();
                call.cluster_header = cluster_header;
                if let Some(hedging) = &hedging {
                    hedging.on_call();
                }
                call.hedging = hedging;
                call.summary.trace = trace;
                return Some((cluster, call));
            }
        };
        let at_once = AtOnce {
            cluster: Some(&cluster),
            method: &method,
            status: refused.0,
            rejected: refused.1,
            trace,
        };
        self.answer_at_once(&mut down.respond, parts, at_once, started, peer);
        None
    }

    /// Answers a call with sluice's own status before any attempt: counts why (before the
    /// answer, so a client that reads the metrics next sees it), answers, and records and
    /// logs the call.
    fn answer_at_once(
        &self,
        respond: &mut h2::server::SendResponse<bytes::Bytes>,
        request: &http::request::Parts,
        at_once: AtOnce<'_>,
        started: Instant,
        peer: &Peer,
    ) {
        let AtOnce {
            cluster,
            method,
            status,
            rejected,
            trace,
        } = at_once;
        if let Some(reason) = rejected {
            match cluster {
                Some(cluster) => cluster.stats.rejected(reason),
                None => unrouted().rejected(reason),
            }
        }
        let ending = Ending {
            rejected,
            ..Ending::proxy(status.code)
        };
        reply::status(respond, status);
        method.record(ending.code, ending.origin, started.elapsed());
        let summary = Summary {
            trace,
            ..Summary::default()
        };
        self.ended(request, cluster, summary, ending, started, peer);
    }

    /// A call has ended: its access log line, and its spans.
    fn ended(
        &self,
        request: &http::request::Parts,
        cluster: Option<&Arc<Cluster>>,
        mut summary: Summary,
        ending: Ending,
        started: Instant,
        peer: &Peer,
    ) {
        self.log(request, cluster, &summary, ending, started, peer);
        let trace = summary.trace.take();
        let kept = trace.filter(|t| Tracer::keeps(t, ending.code));
        if let (Some(tracer), Some(trace)) = (&self.tracer, kept) {
            tracer.finish(FinishedCall {
                trace,
                path: request.uri.path().to_string(),
                code: ending.code,
                origin: ending.origin,
                listener: self.listener.clone(),
                cluster: cluster.map(|c| c.name.clone()),
                peer: peer.addr,
                rejected: ending.rejected.map(Reject::cause),
                ended: std::time::Instant::now(),
            });
        }
    }

    /// Writes the call's access log line, when the log is on.
    fn log(
        &self,
        request: &http::request::Parts,
        cluster: Option<&Arc<Cluster>>,
        summary: &Summary,
        ending: Ending,
        started: Instant,
        peer: &Peer,
    ) {
        let Some(log) = &self.access_log else { return };
        // A traced call without a trace header: the id of the trace sluice started for it.
        let found = request_id::find(&request.headers);
        let started_trace = match (found, &summary.trace) {
            (None, Some(trace)) => crate::certs::hex(&trace.trace_id),
            _ => String::new(),
        };
        log.write(&Entry {
            time: access_log::now_rfc3339(),
            listener: &self.listener,
            peer: peer.addr,
            path: request.uri.path(),
            cluster: cluster.map(|c| c.name.as_str()),
            backend: summary.backend.as_ref().map(|b| b.address.0.as_str()),
            attempts: summary.attempts,
            grpc_status: ending.code as u32,
            grpc_code: ending.code.go_name(),
            origin: ending.origin.label(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: summary.bytes_in,
            bytes_out: summary.bytes_out,
            trace_id: found.unwrap_or(&started_trace),
            rejected: ending.rejected.map(Reject::cause),
            client_subject: peer.cert.as_ref().map(|c| c.subject.as_str()),
            client_sans: peer.cert.as_ref().map(ClientCert::sans),
            protocol: peer.web.map_or("grpc", web::Mode::label),
        });
    }
}

/// A call sluice answers itself before any attempt (no route, rate limited, a malformed
/// `grpc-timeout`): its cluster if routed, its method's counters, the status, and why.
struct AtOnce<'a> {
    cluster: Option<&'a Arc<Cluster>>,
    method: &'a crate::telemetry::MethodStats,
    status: ProxyStatus,
    rejected: Option<Reject>,
    trace: Option<Box<CallTrace>>,
}

/// The call's budget: the client's `grpc-timeout`, capped by the cluster's `max_deadline`,
/// which also applies when the client sent none. A malformed value is the client's error.
fn deadline_budget(
    request: &http::request::Parts,
    cluster: &Cluster,
) -> Result<Duration, ProxyStatus> {
    let max = cluster.settings.max_deadline;
    match request.headers.get(wire::GRPC_TIMEOUT) {
        None => Ok(max),
        Some(value) => match wire::parse_timeout(value.as_bytes()) {
            Some(timeout) => Ok(timeout.min(max)),
            None => Err(ProxyStatus::new(
                Code::Internal,
                format!("sluice: malformed grpc-timeout {value:?}"),
            )),
        },
    }
}

/// Decrements a gauge when dropped (a connection's `sluice_downstream_connections`).
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
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
