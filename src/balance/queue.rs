//! Calls waiting for a backend with a free slot, first come first served.
//!
//! A backend holds at most `max_concurrent_streams_per_backend` calls. When every candidate is
//! full, a call joins its cluster's queue; a call that finishes on any backend of the cluster
//! wakes the head of the queue at once (no polling), which then picks again. While anyone
//! waits, new calls queue behind them instead of taking a freed slot first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// One cluster's queue, shared by its backends and kept across reloads.
#[derive(Debug)]
pub struct SlotQueue {
    waiting: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    /// `waiting.len()`, readable without the lock (every finished call reads it).
    len: AtomicUsize,
    next_id: AtomicU64,
    /// Calls one backend may hold (`max_concurrent_streams_per_backend`); a reload may change
    /// it.
    cap: AtomicU64,
}

/// A place in the queue; dropping it (timeout, cancel, woken) leaves the queue.
#[derive(Debug)]
pub struct Waiter {
    queue: Arc<SlotQueue>,
    id: u64,
    /// Fires when a slot was freed for this waiter.
    pub woken: oneshot::Receiver<()>,
}

impl SlotQueue {
    pub fn new(cap: u64) -> SlotQueue {
        SlotQueue {
            waiting: Mutex::new(VecDeque::new()),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            cap: AtomicU64::new(cap),
        }
    }

    pub fn len(&self) -> usize {
        // SeqCst with the in-flight counts (backend.rs): a call that frees a slot and a call
        // that joins the queue then always see each other, so no wakeup falls between them.
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    /// Changes the cap (reload); a higher one frees slots at once.
    pub(super) fn set_cap(&self, cap: u64) {
        let old = self.cap.swap(cap, Ordering::SeqCst);
        for _ in old..cap.min(old + self.len() as u64) {
            self.slot_freed();
        }
    }

    /// Joins the tail; `None` when `max_queued` calls already wait.
    pub fn join(self: &Arc<Self>, max_queued: usize) -> Option<Waiter> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= max_queued {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (wake, woken) = oneshot::channel();
        waiting.push_back((id, wake));
        self.len.store(waiting.len(), Ordering::SeqCst);
        Some(Waiter {
            queue: Arc::clone(self),
            id,
            woken,
        })
    }

    /// A slot is free: the head waiter (still waiting) gets to pick again. A waiter that was
    /// woken but could not use the slot calls this again, to pass the wakeup on.
    pub fn slot_freed(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, wake)) = waiting.pop_front() {
            if wake.send(()).is_ok() {
                break;
            }
        }
        self.len.store(waiting.len(), Ordering::SeqCst);
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.queue.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = waiting.iter().position(|(id, _)| *id == self.id) {
            waiting.remove(at);
            self.queue.len.store(waiting.len(), Ordering::SeqCst);
            return;
        }
        drop(waiting);
        // Woken, but leaving without using the wakeup (its timeout or its client won the
        // race): pass it on, or a free slot would go unnoticed.
        if self.woken.try_recv().is_ok() {
            self.queue.slot_freed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_to_waiters_in_order_and_a_gone_waiter_is_skipped() {
        let queue = Arc::new(SlotQueue::new(1));
        let mut first = queue.join(10).unwrap();
        let second = queue.join(10).unwrap();
        let mut third = queue.join(10).unwrap();
        assert_eq!(queue.len(), 3);
        drop(second);
        assert_eq!(queue.len(), 2);
        queue.slot_freed();
        assert!(first.woken.try_recv().is_ok());
        assert!(third.woken.try_recv().is_err());
        queue.slot_freed();
        assert!(third.woken.try_recv().is_ok());
        assert!(queue.join(0).is_none(), "max_queued 0: no queue");
    }

    #[test]
    fn a_woken_waiter_that_leaves_passes_the_wakeup_on() {
        let queue = Arc::new(SlotQueue::new(1));
        let first = queue.join(10).unwrap();
        let mut second = queue.join(10).unwrap();
        queue.slot_freed();
        // The first was woken, but its timeout won: it leaves without the slot.
        drop(first);
        assert!(second.woken.try_recv().is_ok());
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_higher_cap_wakes_as_many_waiters() {
        let queue = Arc::new(SlotQueue::new(1));
        let mut waiters: Vec<_> = (0..3).map(|_| queue.join(10).unwrap()).collect();
        queue.set_cap(3);
        let woken = waiters
            .iter_mut()
            .filter_map(|w| w.woken.try_recv().ok())
            .count();
        assert_eq!(woken, 2);
    }
}
