//! The admin endpoint: `/metrics`, `/healthz`, `/readyz`, `/backends`, `/backends/history`
//! and a plain status page at `/`; the runtime overrides (`mutate.rs`).
//! Served over HTTP/1.1 by pingora's small `ServeHttp` app; none of it is on the call path.

mod mutate;

pub use mutate::ACTOR_HEADER;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde::Serialize;

use crate::balance::Clusters;
use crate::balance::{BackendSnapshot, SourceView};
use crate::lifecycle::Lifecycle;
use crate::steering::Steering;
use crate::telemetry::{history, metrics, HistoryView};

pub struct Admin {
    pub clusters: Arc<ArcSwap<Clusters>>,
    pub lifecycle: Arc<Lifecycle>,
    pub steering: Arc<Steering>,
    /// `admin.token_file`: mutations need the bearer token it holds (read at each one).
    pub token_file: Option<PathBuf>,
    /// The admin address is loopback: without a token file, mutations are allowed.
    pub loopback: bool,
}

/// `/backends`: every cluster in config order, each with its backends.
#[derive(Serialize)]
struct BackendsView {
    clusters: Vec<ClusterView>,
}

#[derive(Serialize)]
struct ClusterView {
    name: String,
    discovery: SourceView,
    /// True while no backend is usable and calls try them all.
    panic_mode: bool,
    /// Calls waiting for a backend slot.
    queue_depth: usize,
    /// Whether each backend's limit is learned (`adaptive_concurrency`) or fixed at the cap.
    adaptive_concurrency: bool,
    /// The discovered backends, then those removed that still hold calls (`draining`).
    backends: Vec<BackendSnapshot>,
}

/// `/backends/history`: five minutes of each backend's calls, failures and p99, in bins.
#[derive(Serialize)]
struct HistoryPage {
    bin_seconds: u64,
    clusters: Vec<ClusterHistory>,
}

#[derive(Serialize)]
struct ClusterHistory {
    name: String,
    backends: Vec<BackendHistory>,
}

#[derive(Serialize)]
struct BackendHistory {
    address: String,
    #[serde(flatten)]
    bins: HistoryView,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if let Some(answer) = self.mutation(session, &path).await {
            return answer;
        }
        match path.as_str() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics().encode(&**self.clusters.load()),
            ),
            "/readyz" => match self.not_ready_reason() {
                None => text(StatusCode::OK, "ready\n"),
                Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{reason}\n")),
            },
            "/backends" => {
                let body = serde_json::to_vec_pretty(&self.backends()).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            }
            "/backends/history" => {
                let body = serde_json::to_vec(&self.history()).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            }
            "/" => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                STATUS_PAGE.as_bytes().to_vec(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics /healthz /readyz /backends /backends/history /overrides or /\n",
            ),
        }
    }
}

impl Admin {
    /// `None` when ready: listeners bound, every cluster has had its first discovery result,
    /// and not draining.
    fn not_ready_reason(&self) -> Option<String> {
        if self.lifecycle.is_draining() {
            return Some("draining".into());
        }
        if !self.lifecycle.listeners_bound() {
            return Some("listeners not bound yet".into());
        }
        if !self.steering.is_loaded() {
            return Some("waiting for the fleet's overrides from etcd".into());
        }
        let clusters = self.clusters.load();
        let waiting: Vec<&str> = clusters
            .all()
            .iter()
            .filter(|c| !c.is_ready())
            .map(|c| c.name.as_str())
            .collect();
        (!waiting.is_empty())
            .then(|| format!("waiting for first discovery result: {}", waiting.join(", ")))
    }

    fn backends(&self) -> BackendsView {
        let clusters = self.clusters.load();
        BackendsView {
            clusters: clusters
                .all()
                .iter()
                .map(|c| ClusterView {
                    name: c.name.clone(),
                    discovery: c.source.view(),
                    panic_mode: c.in_panic(),
                    queue_depth: c.queue.len(),
                    adaptive_concurrency: c.queue.policy.is_adaptive(),
                    backends: c.backend_views(),
                })
                .collect(),
        }
    }

    fn history(&self) -> HistoryPage {
        let clusters = self.clusters.load();
        let clusters = clusters.all().iter().map(|c| ClusterHistory {
            name: c.name.clone(),
            backends: (c.listed_backends().iter())
                .map(|b| BackendHistory {
                    address: b.address.to_string(),
                    bins: b.stats.history(),
                })
                .collect(),
        });
        HistoryPage {
            bin_seconds: history::BIN.as_secs(),
            clusters: clusters.collect(),
        }
    }
}

/// The status page: static HTML whose script draws `/backends` and `/backends/history` every
/// 2 s (src/status_page.html).
const STATUS_PAGE: &str = include_str!("../status_page.html");

fn text(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(Vec::new());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = content_type.parse() {
        headers.insert(http::header::CONTENT_TYPE, value);
    }
    headers.insert(http::header::CONTENT_LENGTH, body.len().into());
    *response.body_mut() = body;
    response
}
