//! Signals that end the process: SIGTERM and SIGINT drain, SIGQUIT hands the listening sockets
//! to a new process (graceful upgrade), after which the process ends once it has drained.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::lifecycle::Lifecycle;
use crate::telemetry::access_log::AccessLog;

/// Turns SIGTERM and SIGINT into a drain, and SIGQUIT into pingora's graceful upgrade.
pub(super) struct SignalWatch {
    pub(super) lifecycle: Arc<Lifecycle>,
    pub(super) drain_timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for SignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int, mut quit) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(term), Ok(int), Ok(quit)) => (term, int, quit),
            _ => {
                error!("cannot install signal handlers; shutting down");
                return ShutdownSignal::FastShutdown;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {
                // pingora sends the sockets, waits 5 s for the new process to take them, then
                // flips its shutdown watch: our connections send GOAWAY and get its grace
                // period (drain_timeout) to finish.
                info!("SIGQUIT: handing the listening sockets to the new process");
                return ShutdownSignal::GracefulUpgrade;
            }
        }
        info!(timeout = ?self.drain_timeout, "draining: GOAWAY sent, waiting for in-flight streams");
        // A second SIGTERM or SIGINT cuts the drain short.
        let left = tokio::select! {
            left = self.lifecycle.drain(self.drain_timeout) => left,
            _ = term.recv() => usize::MAX,
            _ = int.recv() => usize::MAX,
        };
        match left {
            0 => info!("drained: all connections closed"),
            usize::MAX => warn!("second signal: stopping without waiting"),
            n => warn!(
                connections = n,
                "drain timeout passed; closing what is left"
            ),
        }
        ShutdownSignal::FastShutdown
    }
}

/// How long the access log gets to write its last lines before an upgraded process exits.
pub(super) const LAST_LINES: Duration = Duration::from_secs(1);

/// After an upgrade hands the sockets over, pingora sends GOAWAY on every connection and then
/// sleeps its whole grace period (`drain_timeout`) whatever is left. This ends the process as
/// soon as the last connection has closed instead, or when `drain_timeout` passes, and says
/// which. (On SIGTERM the drain runs before pingora is told to stop; its watch never flips.)
pub(super) struct UpgradeExit {
    pub(super) lifecycle: Arc<Lifecycle>,
    pub(super) drain_timeout: Duration,
    pub(super) access_log: Option<AccessLog>,
}

#[async_trait]
impl BackgroundService for UpgradeExit {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Flips once pingora has handed the sockets over and waited for the new process.
        if shutdown.wait_for(|stopping| *stopping).await.is_err() {
            return;
        }
        info!(timeout = ?self.drain_timeout,
            "upgrade: sockets handed over; draining, GOAWAY sent, waiting for in-flight streams");
        match self.lifecycle.drain(self.drain_timeout).await {
            0 => info!("upgrade: drained, all connections closed; exiting"),
            n => warn!(
                connections = n,
                "upgrade: drain timeout passed; exiting with connections open"
            ),
        }
        // The process ends here, not in pingora's grace period: nothing of it is left to run
        // but the access log's last lines.
        if let Some(log) = &self.access_log {
            log.wait_written(LAST_LINES);
        }
        std::process::exit(0);
    }
}
