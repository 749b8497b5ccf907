//! Process-wide state that every listener and the admin endpoint share: whether the process is
//! draining, how many downstream connections are open, and whether the listeners are bound.
//! The server layer drives it; the proxy and admin layers only read it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Draining, open connections, readiness. One per process, shared by `Arc`.
#[derive(Debug)]
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    connections: AtomicUsize,
    all_closed: Notify,
    listeners_bound: AtomicBool,
}

impl Lifecycle {
    pub fn new() -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            draining: watch::Sender::new(false),
            connections: AtomicUsize::new(0),
            all_closed: Notify::new(),
            listeners_bound: AtomicBool::new(false),
        })
    }

    /// Flips to true once, when draining starts.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    pub fn listeners_bound(&self) -> bool {
        self.listeners_bound.load(Ordering::Acquire)
    }

    /// The listeners accept connections (the server's readiness probe saw each one answer).
    pub fn mark_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::Release);
    }

    /// Counts one downstream connection until the guard drops.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::AcqRel);
        OpenConnection(Arc::clone(self))
    }

    /// Starts draining and waits until every downstream connection closed, or `timeout`.
    /// Returns the number still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.draining.send_replace(true);
        let all_closed = async {
            loop {
                let notified = self.all_closed.notified();
                if self.connections.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, all_closed).await;
        self.connections.load(Ordering::Acquire)
    }
}

/// One open downstream connection.
#[derive(Debug)]
pub struct OpenConnection(Arc<Lifecycle>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}
