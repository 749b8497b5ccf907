//! Calls waiting for a backend with a free slot, served fairly between clients.
//!
//! A backend holds at most its concurrency limit of unanswered calls and
//! `max_concurrent_streams_per_backend` streams ([`LimitPolicy`]). When every candidate is
//! full, a call joins its cluster's queue; a slot freed on any backend of the cluster wakes the
//! next waiter at once (no polling), which then picks again. While anyone waits, new calls
//! queue behind them instead of taking a freed slot first.
//!
//! Waiters are grouped by client (`client_key`). Clients take turns, each served first come
//! first served, so a client sending ten times the others' calls waits ten times as long, not
//! everyone. When the queue is full, a newcomer displaces the newest waiter of the client with
//! the most waiting, unless that is its own client: the client sending the most is shed first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxBuildHasher;
use tokio::sync::oneshot;

use super::limit::LimitPolicy;

/// Who a waiting call belongs to: a hash of its `client_key` value.
pub type ClientId = u64;

/// One cluster's queue, shared by its backends and kept across reloads.
#[derive(Debug)]
pub struct SlotQueue {
    waiting: Mutex<Waiting>,
    /// The number of waiters, readable without the lock (every finished call reads it).
    len: AtomicUsize,
    next_id: AtomicU64,
    /// The limits backends take slots under; a reload sets them again.
    pub policy: LimitPolicy,
    /// How long a waiter recently waited per call served before it (ns, f64 bits; 0 until a
    /// waiter was served): what a newcomer's wait is expected from.
    wait_per_place: AtomicU64,
}

/// Waiters by client, and the clients' turns.
#[derive(Debug, Default)]
struct Waiting {
    by_client: HashMap<ClientId, VecDeque<(u64, oneshot::Sender<Wake>)>, FxBuildHasher>,
    /// Clients with waiters, the next to be served first.
    turns: VecDeque<ClientId>,
    len: usize,
}

/// Why a waiter was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A slot is free: pick again.
    Slot,
    /// The queue was full, and this waiter's client had the most waiting: shed it.
    Displaced,
}

/// A place in the queue; dropping it (timeout, cancel, woken) leaves the queue.
#[derive(Debug)]
pub struct Waiter {
    queue: Arc<SlotQueue>,
    client: ClientId,
    id: u64,
    /// Waiters to be served before this one when it joined.
    pub ahead: usize,
    /// Fires when a slot was freed for this waiter, or it was displaced.
    pub woken: oneshot::Receiver<Wake>,
}

impl SlotQueue {
    pub fn new(policy: LimitPolicy) -> SlotQueue {
        SlotQueue {
            waiting: Mutex::new(Waiting::default()),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            policy,
            wait_per_place: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        crate::sync::lock(&self.waiting)
    }

    pub fn len(&self) -> usize {
        // SeqCst with the in-flight and unanswered counts (backend.rs, limit.rs): a call that
        // frees a slot and a call that joins the queue then always see each other, so no
        // wakeup falls between them.
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every waiter to pick again (the limits changed on reload); those that find no
    /// slot rejoin at the head.
    pub(super) fn wake_all(&self) {
        for _ in 0..self.len() {
            self.slot_freed();
        }
    }

    /// Joins behind `client`'s other waiters; `None` when `max_queued` calls already wait and
    /// none of another client may be displaced. With `again` (a waiter woken for a slot it
    /// could not use), it joins at the head instead, its client first in turn: it keeps the
    /// place it had.
    pub fn join(
        self: &Arc<Self>,
        client: ClientId,
        max_queued: usize,
        again: bool,
    ) -> Option<Waiter> {
        let mut waiting = self.lock();
        let own = waiting.by_client.get(&client).map_or(0, VecDeque::len);
        // A waiter woken in vain had its place already: it is never refused it.
        let full = waiting.len >= max_queued && !again;
        if full && !waiting.displace_heaviest(client, own) {
            return None;
        }
        let ahead = match again {
            true => 0,
            false => waiting.ahead_of_newcomer(client, own),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (wake, woken) = oneshot::channel();
        let queue = waiting.by_client.entry(client).or_default();
        match again {
            true => queue.push_front((id, wake)),
            false => queue.push_back((id, wake)),
        }
        if again {
            waiting.turns.retain(|turn| *turn != client);
            waiting.turns.push_front(client);
        } else if own == 0 {
            waiting.turns.push_back(client);
        }
        waiting.len += 1;
        self.store_len(waiting.len);
        Some(Waiter {
            queue: Arc::clone(self),
            client,
            id,
            ahead,
            woken,
        })
    }

    /// How long a newcomer of `client` would be expected to wait, were it to join now; zero
    /// (without taking the lock) until a waiter has been served.
    pub fn expected_wait_for(&self, client: ClientId) -> Duration {
        if self.wait_per_place.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        let waiting = self.lock();
        let own = waiting.by_client.get(&client).map_or(0, VecDeque::len);
        let ahead = waiting.ahead_of_newcomer(client, own);
        drop(waiting);
        self.expected_wait(ahead)
    }

    /// A slot is free: the next client's first waiter gets to pick again. A waiter that was
    /// woken but could not use the slot calls this again, to pass the wakeup on.
    pub fn slot_freed(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiting = self.lock();
        while let Some(client) = waiting.turns.pop_front() {
            let Some(queue) = waiting.by_client.get_mut(&client) else {
                continue;
            };
            let first = queue.pop_front();
            if queue.is_empty() {
                waiting.by_client.remove(&client);
            } else {
                waiting.turns.push_back(client);
            }
            let Some((_, wake)) = first else { continue };
            waiting.len -= 1;
            if wake.send(Wake::Slot).is_ok() {
                break;
            }
        }
        self.store_len(waiting.len);
    }

    /// Publishes the number of waiters. An emptied queue forgets its expected wait: the next
    /// overload is judged by its own waits, not the last one's.
    fn store_len(&self, len: usize) {
        self.len.store(len, Ordering::SeqCst);
        if len == 0 {
            self.wait_per_place.store(0, Ordering::Relaxed);
        }
    }

    /// A waiter got its slot after `waited`, with `ahead` waiters served before it: teaches
    /// the expected wait of the next ones.
    pub fn served(&self, waited: Duration, ahead: usize) {
        // With nobody left waiting, there is no one to judge by it (see `store_len`).
        if self.is_empty() {
            return;
        }
        let sample = waited.as_nanos() as f64 / (ahead + 1) as f64;
        let current = f64::from_bits(self.wait_per_place.load(Ordering::Relaxed));
        let next = match current {
            0.0 => sample,
            current => current + 0.2 * (sample - current),
        };
        self.wait_per_place.store(next.to_bits(), Ordering::Relaxed);
    }

    /// How long a waiter with `ahead` waiters before it is expected to wait; zero until a
    /// waiter has been served.
    pub fn expected_wait(&self, ahead: usize) -> Duration {
        let per_place = f64::from_bits(self.wait_per_place.load(Ordering::Relaxed));
        Duration::from_nanos((per_place * (ahead + 1) as f64) as u64)
    }

    /// How long a call that joined now would be expected to wait (for `grpc-retry-pushback-ms`):
    /// every waiter is ahead of it, at worst.
    pub fn expected_wait_of_newcomer(&self) -> Duration {
        self.expected_wait(self.len())
    }
}

impl Waiting {
    /// Makes room for `client` (with `own` waiters) in a full queue: displaces the newest
    /// waiter of the client with the most, if that client has more than `client` would
    /// after joining. Returns whether there is room now.
    fn displace_heaviest(&mut self, client: ClientId, own: usize) -> bool {
        let heaviest = (self.by_client.iter_mut())
            .filter(|(id, _)| **id != client)
            .max_by_key(|(_, queue)| queue.len())
            .filter(|(_, queue)| queue.len() > own + 1);
        let Some((_, queue)) = heaviest else {
            return false;
        };
        // It has more than one waiter: it keeps at least one, and its turn.
        if let Some((_, wake)) = queue.pop_back() {
            self.len -= 1;
            let _ = wake.send(Wake::Displaced);
        }
        true
    }

    /// The waiters served before a newcomer of `client`, who has `own` waiting already: its
    /// own, and of every other client up to one more than that, as turns go round.
    fn ahead_of_newcomer(&self, client: ClientId, own: usize) -> usize {
        if own == 0 {
            return self.turns.len();
        }
        (self.by_client.iter())
            .map(|(id, queue)| match *id == client {
                true => own,
                false => queue.len().min(own + 1),
            })
            .sum()
    }

    /// Removes waiter `id` of `client`; returns whether it was still there.
    fn remove(&mut self, client: ClientId, id: u64) -> bool {
        let Some(queue) = self.by_client.get_mut(&client) else {
            return false;
        };
        let Some(at) = queue.iter().position(|(waiter, _)| *waiter == id) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.by_client.remove(&client);
            self.turns.retain(|turn| *turn != client);
        }
        self.len -= 1;
        true
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.queue.lock();
        if waiting.remove(self.client, self.id) {
            self.queue.store_len(waiting.len);
            return;
        }
        drop(waiting);
        // Woken, but leaving without using the wakeup (its timeout or its client won the
        // race): pass it on, or a free slot would go unnoticed.
        if self.woken.try_recv() == Ok(Wake::Slot) {
            self.queue.slot_freed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(cap: u32) -> Arc<SlotQueue> {
        let yaml = format!(
            "listeners: [{{name: l, address: \"127.0.0.1:1\"}}]\nclusters: [{{name: c, max_concurrent_streams_per_backend: {cap}, discovery: {{static: [\"a:1\"]}}}}]"
        );
        let config = crate::config::Config::parse(&yaml, "t").unwrap();
        Arc::new(SlotQueue::new(LimitPolicy::new(&config.clusters[0])))
    }

    #[test]
    fn slots_go_to_waiters_in_order_and_a_gone_waiter_is_skipped() {
        let queue = queue(1);
        let mut first = queue.join(1, 10, false).unwrap();
        let second = queue.join(1, 10, false).unwrap();
        let mut third = queue.join(1, 10, false).unwrap();
        assert_eq!(queue.len(), 3);
        drop(second);
        assert_eq!(queue.len(), 2);
        queue.slot_freed();
        assert_eq!(first.woken.try_recv(), Ok(Wake::Slot));
        assert!(third.woken.try_recv().is_err());
        queue.slot_freed();
        assert_eq!(third.woken.try_recv(), Ok(Wake::Slot));
        assert!(queue.join(1, 0, false).is_none(), "max_queued 0: no queue");
    }

    #[test]
    fn a_woken_waiter_that_leaves_passes_the_wakeup_on() {
        let queue = queue(1);
        let first = queue.join(1, 10, false).unwrap();
        let mut second = queue.join(1, 10, false).unwrap();
        queue.slot_freed();
        // The first was woken, but its timeout won: it leaves without the slot.
        drop(first);
        assert_eq!(second.woken.try_recv(), Ok(Wake::Slot));
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn new_limits_wake_every_waiter_and_one_woken_in_vain_is_never_refused() {
        let queue = queue(1);
        let mut waiters: Vec<_> = (0..3).map(|_| queue.join(1, 3, false).unwrap()).collect();
        queue.wake_all();
        let woken = waiters
            .iter_mut()
            .filter_map(|w| w.woken.try_recv().ok())
            .count();
        assert_eq!(woken, 3);
        // A newcomer fills the queue; the first waiter, woken in vain, still gets back in.
        let _others: Vec<_> = (0..3).map(|_| queue.join(2, 3, false).unwrap()).collect();
        assert!(queue.join(1, 3, true).is_some());
    }

    #[test]
    fn clients_take_turns_and_a_newcomer_counts_only_the_turns_before_it() {
        let queue = queue(1);
        let mut heavy: Vec<_> = (0..4).map(|_| queue.join(7, 100, false).unwrap()).collect();
        assert_eq!(heavy[3].ahead, 3);
        let mut light = queue.join(8, 100, false).unwrap();
        // One heavy waiter is served before it, not four.
        assert_eq!(light.ahead, 1);
        queue.slot_freed();
        queue.slot_freed();
        assert_eq!(heavy[0].woken.try_recv(), Ok(Wake::Slot));
        assert_eq!(light.woken.try_recv(), Ok(Wake::Slot));
        assert!(heavy[1].woken.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_displaces_the_heaviest_client_not_a_light_one() {
        let queue = queue(1);
        let mut heavy: Vec<_> = (0..3).map(|_| queue.join(7, 4, false).unwrap()).collect();
        let _light = queue.join(8, 4, false).unwrap();
        // Full: a second light call displaces the heavy client's newest waiter.
        let _light_again = queue.join(8, 4, false).unwrap();
        assert_eq!(heavy[2].woken.try_recv(), Ok(Wake::Displaced));
        assert_eq!(queue.len(), 4);
        // The heavy client itself is refused: it has the most already.
        assert!(queue.join(7, 4, false).is_none());
        // Evenly shared: nobody is displaced for a newcomer of a client already there.
        drop(heavy.remove(0));
        drop(heavy.remove(0));
        assert_eq!(queue.len(), 2);
        let _third = queue.join(8, 3, false).unwrap();
        assert!(queue.join(8, 3, false).is_none());
    }

    #[test]
    fn a_waiter_woken_in_vain_keeps_its_place() {
        let queue = queue(1);
        let _first = queue.join(7, 10, false).unwrap();
        let mut light = queue.join(8, 10, false).unwrap();
        // Woken for a slot it could not use, the first waits again: at the head, first in
        // turn, before the light client's waiter.
        let mut again = queue.join(7, 10, true).unwrap();
        assert_eq!(again.ahead, 0);
        queue.slot_freed();
        assert_eq!(again.woken.try_recv(), Ok(Wake::Slot));
        assert!(light.woken.try_recv().is_err());
    }

    #[test]
    fn the_expected_wait_follows_served_waiters_until_the_queue_empties() {
        let queue = queue(1);
        assert_eq!(queue.expected_wait(5), Duration::ZERO);
        let waiter = queue.join(1, 10, false).unwrap();
        // Another waiter waited 40 ms with 3 served before it: 10 ms a place.
        queue.served(Duration::from_millis(40), 3);
        assert_eq!(queue.expected_wait(1), Duration::from_millis(20));
        drop(waiter);
        assert_eq!(queue.expected_wait(1), Duration::ZERO);
    }
}
