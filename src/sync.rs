//! Small shared pieces for code that runs on many threads and tasks. Imports nothing from the
//! crate.

use std::sync::{Mutex, MutexGuard};

use tokio::task::JoinHandle;

/// Locks `mutex`, even if a thread panicked while holding it: every lock in sluice guards data
/// that each critical section leaves whole, so a panic elsewhere must not take the proxy down
/// with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Tasks that live as long as this value: dropping it aborts them (one config generation's
/// discovery watches, or its health checkers).
#[derive(Debug, Default)]
pub struct AbortOnDrop {
    tasks: Vec<JoinHandle<()>>,
}

impl AbortOnDrop {
    pub fn new(tasks: Vec<JoinHandle<()>>) -> AbortOnDrop {
        AbortOnDrop { tasks }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
