//! Background services: the readiness probe of the listeners, and the per-second rate sampler
//! behind `/backends`' recent rates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tracing::error;

use crate::lifecycle::Lifecycle;
use crate::proxy::Router;

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
/// status page show.
pub(super) struct RateSampler {
    pub(super) router: Arc<ArcSwap<Router>>,
}

#[async_trait]
impl BackgroundService for RateSampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    for cluster in self.router.load().clusters() {
                        for backend in &cluster.backends().backends {
                            backend.stats.sample_rates();
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
