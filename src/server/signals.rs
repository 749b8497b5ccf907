//! Signals that end the process: SIGTERM and SIGINT drain, SIGQUIT hands the listening sockets
//! to a new process (graceful upgrade).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::lifecycle::Lifecycle;

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
