//! An in-process listener for the `listener` fuzz target (fuzz/checks.rs) and its replay on
//! stable (tests/fuzz_corpora.rs): a whole downstream connection, fed the HTTP/2 preface and
//! then raw bytes over an in-memory stream, served by the same code as a real listener's
//! (`serve_h2`: the h2 server, the connection policy, routing, the calls). The one cluster
//! has no backends, so a call ends in the proxy without any network I/O. Not part of the
//! product: nothing else uses it.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::connection::ConnectionPolicy;
use super::{Peer, Proxy, Router};
use crate::balance::{Cluster, Clusters};
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::telemetry::metrics;
use crate::transport::H2Settings;

const CONFIG: &str = "listeners: [{name: fuzz, address: \"127.0.0.1:1\"}]\n\
                      clusters: [{name: echo, discovery: {static: [\"127.0.0.1:1\"]}}]\n";

/// The client's connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long one connection may take to end once its client has sent everything and closed:
/// longer means the connection hangs, which is a failure.
const ENDS_WITHIN: Duration = Duration::from_secs(5);

/// A listener on one thread, serving in-memory connections.
pub struct FuzzListener {
    proxy: Arc<Proxy>,
    runtime: tokio::runtime::Runtime,
}

impl FuzzListener {
    /// # Panics
    /// If the fixed config above does not parse, or no runtime can start: a broken build.
    pub fn new() -> FuzzListener {
        let config = Config::parse(CONFIG, "fuzz listener").expect("the fuzz config parses");
        let overrides = crate::overrides::Overrides::new();
        let cluster = Cluster::new(&config.clusters[0], None, &config.client_key, overrides);
        let clusters = Clusters::new(vec![Arc::new(cluster)]);
        let listener = &config.listeners[0];
        let proxy = Proxy {
            listener: "fuzz".into(),
            router: Arc::new(ArcSwap::from_pointee(Router::new(
                &config,
                &clusters,
                &Default::default(),
                &Default::default(),
            ))),
            lifecycle: Lifecycle::new(),
            h2: H2Settings::default(),
            access_log: None,
            tracer: None,
            generate_request_id: true,
            connections_gauge: metrics().downstream_connections("fuzz"),
            tls: None,
            forward_client_cert: None,
            identity_headers: Arc::new([]),
            policy: ConnectionPolicy::of(listener),
            max_connections: None,
            open: Default::default(),
            grpc_web: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        FuzzListener {
            proxy: Arc::new(proxy),
            runtime,
        }
    }

    /// Serves one connection that sends the preface, then `bytes`, then closes its side;
    /// returns what the listener wrote back. Panics if the connection does not end.
    pub fn feed(&self, bytes: &[u8]) -> Vec<u8> {
        self.runtime.block_on(async {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (mut from_proxy, mut to_proxy) = tokio::io::split(client);
            let serving = serve(Arc::clone(&self.proxy), server);
            let sending = async move {
                let _ = to_proxy.write_all(PREFACE).await;
                let _ = to_proxy.write_all(bytes).await;
                let _ = to_proxy.shutdown().await;
            };
            let mut answer = Vec::new();
            let receiving = from_proxy.read_to_end(&mut answer);
            let all = async { tokio::join!(serving, sending, receiving) };
            let ended = tokio::time::timeout(ENDS_WITHIN, all).await;
            assert!(
                ended.is_ok(),
                "the connection did not end within {ENDS_WITHIN:?}"
            );
            answer
        })
    }

    /// Makes one well-formed gRPC call on a fresh connection; returns its `grpc-status`.
    /// The cluster has no backends, so a listener that still works answers UNAVAILABLE (14).
    pub fn call(&self) -> Option<String> {
        self.runtime.block_on(async {
            let (client, server) = tokio::io::duplex(1 << 16);
            let serving = tokio::spawn(serve(Arc::clone(&self.proxy), server));
            let status = tokio::time::timeout(ENDS_WITHIN, one_call(client)).await;
            serving.abort();
            status.ok().flatten()
        })
    }
}

impl Default for FuzzListener {
    fn default() -> Self {
        FuzzListener::new()
    }
}

/// `proxy` serving one connection over `io`, as a listener serves an accepted one.
async fn serve(proxy: Arc<Proxy>, io: tokio::io::DuplexStream) {
    // Held while it serves: a dropped sender would read as a shutdown.
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let peer = Arc::new(Peer::default());
    proxy
        .serve_h2(io, peer, Instant::now() + ENDS_WITHIN, shutdown)
        .await;
}

async fn one_call(io: tokio::io::DuplexStream) -> Option<String> {
    let (mut sender, connection) = h2::client::handshake(io).await.ok()?;
    tokio::spawn(connection);
    let request = http::Request::post("http://fuzz/echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let (response, mut body) = sender.send_request(request, false).ok()?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .ok()?;
    let (head, mut answer) = response.await.ok()?.into_parts();
    let status = match head.headers.get("grpc-status") {
        Some(status) => status.clone(),
        None => answer.trailers().await.ok()??.get("grpc-status")?.clone(),
    };
    status.to_str().ok().map(str::to_string)
}
