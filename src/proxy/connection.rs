//! One downstream HTTP/2 connection's life after its handshake: accept streams, and apply the
//! listener's connection policy. GOAWAY on drain, after `max_connection_age` (±10%, so a
//! fleet's clients do not all reconnect at once) and after `keepalive.idle_timeout` without a
//! stream; the grace after max-age, then the connection closes; server PINGs that find a dead
//! client (`ping_interval`, `ping_timeout`); GOAWAY ENHANCE_YOUR_CALM for a client that pings
//! too often (ping_watch.rs).

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, PingPong, Reason};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};
use tracing::debug;

use super::ping_watch::{PingAlarm, PingRules, PingWatch};
use super::{Peer, Proxy, StreamCount};
use crate::config::ListenerConfig;
use crate::transport::coalesce::CoalescingIo;

/// A listener's policy for its client connections (`listeners[]` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionPolicy {
    /// GOAWAY after this age (±10%); `None`: never.
    pub max_age: Option<Duration>,
    /// After that GOAWAY, streams get this long, then the connection closes; `None`: as
    /// long as they take.
    pub max_age_grace: Option<Duration>,
    /// GOAWAY after this long without a stream.
    pub idle_timeout: Duration,
    /// A server PING this often...
    pub ping_interval: Duration,
    /// ...unanswered this long closes the connection.
    pub ping_timeout: Duration,
    pub pings: PingRules,
}

impl ConnectionPolicy {
    /// A listener's policy, from its config.
    pub fn of(listener: &ListenerConfig) -> ConnectionPolicy {
        let keepalive = &listener.keepalive;
        ConnectionPolicy {
            max_age: listener.max_connection_age.map(|d| d.0),
            max_age_grace: listener.max_connection_age_grace.map(|d| d.0),
            idle_timeout: keepalive.idle_timeout.0,
            ping_interval: keepalive.ping_interval.0,
            ping_timeout: keepalive.ping_timeout.0,
            pings: PingRules {
                min_interval: keepalive.min_ping_interval.0,
                permit_without_stream: keepalive.permit_without_stream,
            },
        }
    }
}

/// Far enough away to stand for "never" in a timer.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The policy's clocks for one connection.
struct Clocks {
    /// Checks idleness and PINGs; its period follows the shortest of their timeouts.
    tick: tokio::time::Interval,
    /// When the connection last had a call open, as the ticks saw it.
    idle_since: Instant,
    /// Streams accepted when the last tick looked: a call that came and went between two
    /// ticks still counts as activity.
    accepted_at_tick: u64,
    next_ping: Instant,
    ping_sent: Option<Instant>,
}

impl Clocks {
    fn new(policy: &ConnectionPolicy) -> Clocks {
        let now = Instant::now();
        let shortest = (policy.idle_timeout)
            .min(policy.ping_interval)
            .min(policy.ping_timeout);
        let period = (shortest / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        Clocks {
            tick: tokio::time::interval_at(now + period, period),
            idle_since: now,
            accepted_at_tick: 0,
            next_ping: now + policy.ping_interval,
            ping_sent: None,
        }
    }
}

/// What the tick found.
enum Due {
    Nothing,
    Idle,
    DeadClient,
    Ping,
}

/// The connection's state, as the loop's arms change it.
struct Serving {
    streams: Arc<AtomicUsize>,
    accepted: u64,
    goaway_sent: bool,
    calmed: bool,
}

type Downstream<IO> = h2::server::Connection<CoalescingIo<PingWatch<IO>>, Bytes>;

impl Proxy {
    /// Serves HTTP/2 on a connection until it closes. The client's preface must arrive by
    /// `deadline`. On drain (SIGTERM, or pingora's own shutdown during an upgrade) it sends
    /// GOAWAY and keeps serving the streams in flight.
    pub(super) async fn serve_h2<IO>(
        self: &Arc<Self>,
        io: IO,
        peer: Arc<Peer>,
        deadline: Instant,
        mut shutdown: ShutdownWatch,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        // Calls in flight on this connection: write coalescing waits only when there are
        // several (transport/coalesce.rs), and the PING policy counts on it.
        let streams = Arc::new(AtomicUsize::new(0));
        let alarm = Arc::new(PingAlarm::default());
        let Some(mut connection) = self.handshake(io, &streams, &alarm, deadline).await else {
            return;
        };
        let mut ping = connection.ping_pong();
        let mut clocks = Clocks::new(&self.policy);
        let mut draining = self.lifecycle.draining();
        let mut state = Serving {
            streams,
            accepted: 0,
            goaway_sent: false,
            calmed: false,
        };
        // Made once, outside the loop: a timer or waiter registered per accepted stream
        // would cost every call.
        let jitter = |age: Duration| crate::pace::jitter(age, 0.9, 1.1);
        let max_age = sleep_until(Instant::now() + self.policy.max_age.map_or(NEVER, jitter));
        let grace_over = sleep_until(Instant::now() + NEVER);
        let tripped = alarm.tripped();
        tokio::pin!(max_age, grace_over, tripped);
        loop {
            tokio::select! {
                // Ends when the client closes, the connection fails, or (after GOAWAY) the
                // last stream finishes.
                next = connection.accept() => match next {
                    Some(Ok((request, respond))) => self.spawn_call(request, respond, &peer, &mut state),
                    Some(Err(error)) => {
                        debug!(%error, listener = %self.listener, "downstream connection error");
                        break;
                    }
                    None => break,
                },
                // Fires once, when draining starts.
                _ = async {
                    tokio::select! {
                        _ = draining.wait_for(|d| *d) => {}
                        _ = shutdown.wait_for(|s| *s) => {}
                    }
                }, if !state.goaway_sent => {
                    connection.graceful_shutdown();
                    state.goaway_sent = true;
                }
                _ = &mut max_age, if !state.goaway_sent => {
                    debug!(listener = %self.listener, peer = ?peer.addr,
                        "max_connection_age reached: GOAWAY");
                    connection.graceful_shutdown();
                    state.goaway_sent = true;
                    if let Some(grace) = self.policy.max_age_grace {
                        grace_over.as_mut().reset(Instant::now() + grace);
                    }
                }
                _ = &mut grace_over => {
                    debug!(listener = %self.listener, peer = ?peer.addr,
                        "max_connection_age_grace over: closing with streams still open");
                    connection.abrupt_shutdown(Reason::NO_ERROR);
                    grace_over.as_mut().reset(Instant::now() + NEVER);
                }
                // The GOAWAY goes out and the connection ends with it (`accept` returns None).
                _ = &mut tripped, if !state.calmed => {
                    debug!(listener = %self.listener, peer = ?peer.addr,
                        "client pings too often: GOAWAY ENHANCE_YOUR_CALM");
                    connection.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    state.calmed = true;
                }
                _ = clocks.tick.tick() => {
                    let due = self.due(&mut clocks, &state);
                    if !self.act_on(due, &mut connection, &mut ping, &mut clocks, &mut state, &peer) {
                        break;
                    }
                }
                pong = poll_fn(|cx| pong_of(&mut ping, cx)), if clocks.ping_sent.is_some() => {
                    clocks.ping_sent = None;
                    clocks.next_ping = Instant::now() + self.policy.ping_interval;
                    if pong.is_err() {
                        break;
                    }
                }
            }
        }
    }

    /// The HTTP/2 handshake over the PING watcher and the coalescing writer, bounded by
    /// `deadline` (a client that never sends its preface holds nothing for long).
    async fn handshake<IO>(
        &self,
        io: IO,
        streams: &Arc<AtomicUsize>,
        alarm: &Arc<PingAlarm>,
        deadline: Instant,
    ) -> Option<Downstream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let pings = self.policy.pings;
        let watched = PingWatch::new(io, pings, Arc::clone(streams), Arc::clone(alarm));
        let handshake = h2::server::Builder::new()
            .initial_window_size(self.h2.stream_window)
            .initial_connection_window_size(self.h2.connection_window)
            .max_frame_size(self.h2.max_frame_size)
            .max_concurrent_streams(self.h2.max_concurrent_streams)
            .max_header_list_size(self.h2.max_header_list_size)
            .handshake::<_, Bytes>(CoalescingIo::new(watched, Arc::clone(streams)));
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(connection)) => Some(connection),
            Ok(Err(error)) => {
                // A bad client, not a proxy fault: debug only, the accept loop goes on.
                debug!(%error, listener = %self.listener, "downstream handshake failed");
                None
            }
            Err(_) => {
                debug!(listener = %self.listener, "no HTTP/2 preface in time: closed");
                None
            }
        }
    }

    /// Runs one accepted stream as a call of its own.
    fn spawn_call(
        self: &Arc<Self>,
        request: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
        peer: &Arc<Peer>,
        state: &mut Serving,
    ) {
        state.accepted += 1;
        let proxy = Arc::clone(self);
        let peer = Arc::clone(peer);
        let open = StreamCount::open(&state.streams);
        // Boxed: tokio copies a task's future when it spawns and finishes it (7 memcpys); a
        // call's state machine is kilobytes, a box is a pointer.
        let down = super::call::Downstream::new(request, respond);
        tokio::spawn(Box::pin(proxy.serve_call(down, peer, open)));
    }

    /// What is due at a tick: a PING unanswered past its timeout, the next PING, or (before
    /// any GOAWAY) idle past the timeout. PINGs come first: a client that vanished after an
    /// idle GOAWAY is still found.
    fn due(&self, clocks: &mut Clocks, state: &Serving) -> Due {
        let now = Instant::now();
        match clocks.ping_sent {
            Some(sent) if now.duration_since(sent) >= self.policy.ping_timeout => {
                return Due::DeadClient
            }
            None if now >= clocks.next_ping => return Due::Ping,
            _ => {}
        }
        let active =
            state.streams.load(Ordering::Relaxed) > 0 || state.accepted != clocks.accepted_at_tick;
        clocks.accepted_at_tick = state.accepted;
        if active {
            clocks.idle_since = now;
        } else if !state.goaway_sent
            && now.duration_since(clocks.idle_since) >= self.policy.idle_timeout
        {
            return Due::Idle;
        }
        Due::Nothing
    }

    /// Acts on what a tick found; returns false when the connection must close now.
    fn act_on<IO>(
        &self,
        due: Due,
        connection: &mut Downstream<IO>,
        ping: &mut Option<PingPong>,
        clocks: &mut Clocks,
        state: &mut Serving,
        peer: &Peer,
    ) -> bool
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match due {
            Due::Nothing => {}
            Due::Idle => {
                debug!(listener = %self.listener, peer = ?peer.addr, "idle_timeout: GOAWAY");
                connection.graceful_shutdown();
                state.goaway_sent = true;
            }
            Due::DeadClient => {
                debug!(listener = %self.listener, peer = ?peer.addr,
                    "client did not answer a PING: closing");
                return false;
            }
            Due::Ping => {
                let sent = ping
                    .as_mut()
                    .is_some_and(|p| p.send_ping(Ping::opaque()).is_ok());
                clocks.ping_sent = sent.then(Instant::now);
                if !sent {
                    clocks.next_ping = Instant::now() + self.policy.ping_interval;
                }
            }
        }
        true
    }
}

fn pong_of(
    ping: &mut Option<PingPong>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<(), h2::Error>> {
    match ping {
        Some(ping) => ping.poll_pong(cx).map_ok(drop),
        None => std::task::Poll::Pending,
    }
}
