//! Background services: the readiness probe of the listeners, and the per-second rate sampler
//! behind `/backends`' recent rates and the status page's five-minute charts, which also
//! reviews each cluster's overload for the log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tracing::error;

use crate::balance::Clusters;
use crate::lifecycle::Lifecycle;
use crate::telemetry::history;

/// Marks the listeners bound once each accepts a TCP connection (pingora does not report it).
pub(super) struct Readiness {
    pub(super) addresses: Vec<SocketAddr>,
    pub(super) lifecycle: Arc<Lifecycle>,
}

#[async_trait]
impl BackgroundService for Readiness {
    async fn start(&self, _shutdown: ShutdownWatch) {
        for address in &self.addresses {
            let target = if address.ip().is_unspecified() {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
            } else {
                *address
            };
            // Bounded: 30 s in 10 ms steps.
            let mut bound = false;
            for _ in 0..3000 {
                if tokio::net::TcpStream::connect(target).await.is_ok() {
                    bound = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !bound {
                error!(%address, "listener never accepted a connection; /readyz stays 503");
                return;
            }
        }
        self.lifecycle.mark_listeners_bound();
    }
}

/// Samples every backend's counters each second, for the recent rates `/backends` and the
/// status page show, and closes a history bin of every backend at once every `history::BIN`.
/// It also has each cluster log the start and end of shedding, and limits that halve or
/// double.
pub(super) struct RateSampler {
    pub(super) clusters: Arc<ArcSwap<Clusters>>,
}

#[async_trait]
impl BackgroundService for RateSampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let per_bin = history::BIN.as_secs().max(1);
        let mut seconds = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seconds += 1;
                    let close_bin = seconds.is_multiple_of(per_bin);
                    for cluster in self.clusters.load().all() {
                        cluster.review_overload();
                        // Draining backends too: their bins stay in line with the others'.
                        for backend in &cluster.listed_backends() {
                            backend.stats.sample_rates();
                            if close_bin {
                                backend.stats.close_history_bin();
                            }
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
