//! The task that drives one upstream connection: it polls the h2 connection, publishes the
//! peer's stream limit to the pool, PINGs the backend every `keepalive_interval` while calls
//! are open on it and closes the connection when a PING goes unanswered for
//! `keepalive_timeout` (a host that lost power, a wedged process: the kernel may still ACK,
//! nothing answers), and closes it after `idle_timeout` without a stream.
//!
//! PINGs go out only while streams are open, as gRPC clients do: grpc-go and grpc-java servers
//! by default answer PINGs on a connection without streams with GOAWAY ENHANCE_YOUR_CALM
//! ("too_many_pings") after a few. An idle connection is the idle timeout's business.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::pool::{Connection, PoolInner, Upstream, STREAMS_PER_CONNECTION_CAP};
use super::UpstreamPolicy;

/// Why a connection's driver stopped.
enum End {
    /// h2 finished the connection: the peer closed it, it failed, or every handle to it was
    /// dropped (its backend left) and it shut down cleanly.
    Closed(Result<(), h2::Error>),
    /// A PING went unanswered for `keepalive_timeout`.
    PingTimeout,
    /// No stream for `idle_timeout`.
    Idle,
}

/// How a connection is used: streams open on it now, and streams lent on it so far.
pub(super) struct Use {
    pub(super) streams: Arc<AtomicUsize>,
    pub(super) lends: Arc<AtomicUsize>,
}

/// Set in place of the stream count of a connection closing for idleness: above any stream
/// limit, so the pool lends nothing more on it.
const CLOSING: usize = usize::MAX / 2;

/// Drives `upstream` until it ends, then takes it out of the pool.
pub(super) async fn drive(
    mut upstream: Upstream,
    connection: Weak<Connection>,
    pool: Weak<PoolInner>,
    usage: Use,
    policy: UpstreamPolicy,
) {
    let (idle_timeout, ping_timeout) = (policy.idle_timeout, policy.keepalive_timeout);
    let mut keepalive = Keepalive::new(&mut upstream, policy);
    let mut published = STREAMS_PER_CONNECTION_CAP;
    let end = poll_fn(|cx| {
        if let Poll::Ready(result) = Pin::new(&mut upstream).poll(cx) {
            return Poll::Ready(End::Closed(result));
        }
        // The driver runs for every batch of frames: reach the connection only on a change.
        let max = upstream
            .max_concurrent_send_streams()
            .min(STREAMS_PER_CONNECTION_CAP);
        if max != published {
            if let Some(connection) = connection.upgrade() {
                connection.max_streams.store(max, Ordering::Relaxed);
                published = max;
            }
        }
        keepalive.poll(cx, &usage)
    })
    .await;
    if let Some(connection) = connection.upgrade() {
        connection.closed.store(true, Ordering::Relaxed);
    }
    match end {
        End::Closed(Ok(())) => debug!("upstream connection closed"),
        End::Closed(Err(error)) => debug!(%error, "upstream connection ended"),
        End::PingTimeout => warn!(
            timeout = ?ping_timeout,
            "upstream connection closed: its backend did not answer a PING"
        ),
        End::Idle => debug!(idle = ?idle_timeout, "idle upstream connection closed"),
    }
    if let Some(pool) = pool.upgrade() {
        pool.remove(&connection);
    }
    // Dropping `upstream` here closes the socket; streams still on it fail.
}

/// The PING and idle bookkeeping of one connection, checked on a one-second tick (or the
/// keepalive interval, if shorter).
struct Keepalive {
    ping: Option<super::leg::PingPong>,
    tick: tokio::time::Interval,
    policy: UpstreamPolicy,
    /// When the PING in flight went out.
    ping_sent: Option<Instant>,
    last_ping: Instant,
    /// Since when no stream has been open or lent.
    idle_since: Option<Instant>,
    /// `Use::lends` at the last tick.
    lends_seen: usize,
}

impl Keepalive {
    fn new(upstream: &mut Upstream, policy: UpstreamPolicy) -> Keepalive {
        let period = policy.keepalive_interval.min(Duration::from_secs(1));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Keepalive {
            ping: upstream.ping_pong(),
            tick,
            policy,
            ping_sent: None,
            last_ping: Instant::now(),
            idle_since: None,
            lends_seen: 0,
        }
    }

    /// Registers for the next tick and, while a PING is out, its PONG; `Ready` when the
    /// connection must close.
    fn poll(&mut self, cx: &mut std::task::Context<'_>, usage: &Use) -> Poll<End> {
        if let (Some(ping), Some(_)) = (self.ping.as_mut(), self.ping_sent) {
            if let Poll::Ready(answered) = ping.poll_pong(cx) {
                self.ping_sent = None;
                if answered.is_err() {
                    // The connection is failing; its own poll reports how.
                    self.ping = None;
                }
            }
        }
        while self.tick.poll_tick(cx).is_ready() {
            if let Some(end) = self.on_tick(Instant::now(), usage) {
                return Poll::Ready(end);
            }
        }
        Poll::Pending
    }

    fn on_tick(&mut self, now: Instant, usage: &Use) -> Option<End> {
        let open_streams = usage.streams.load(Ordering::Relaxed);
        if let Some(sent) = self.ping_sent {
            if now.duration_since(sent) >= self.policy.keepalive_timeout {
                return Some(End::PingTimeout);
            }
        } else if open_streams > 0
            && now.duration_since(self.last_ping) >= self.policy.keepalive_interval
        {
            if let Some(ping) = self.ping.as_mut() {
                if ping.send_ping(h2::Ping::opaque()).is_ok() {
                    self.ping_sent = Some(now);
                    self.last_ping = now;
                }
            }
        }
        let lends = usage.lends.load(Ordering::Relaxed);
        if open_streams > 0 || lends != self.lends_seen {
            // In use since the last tick, even if no stream is open right now.
            self.lends_seen = lends;
            self.idle_since = None;
            return None;
        }
        let idle_since = *self.idle_since.get_or_insert(now);
        if now.duration_since(idle_since) < self.policy.idle_timeout {
            return None;
        }
        // Only if nothing was lent meanwhile: from here on the pool lends nothing on it.
        let closing =
            usage
                .streams
                .compare_exchange(0, CLOSING, Ordering::SeqCst, Ordering::SeqCst);
        match closing {
            Ok(_) => Some(End::Idle),
            Err(_) => {
                self.idle_since = None;
                None
            }
        }
    }
}
