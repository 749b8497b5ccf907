//! Upstream HTTP/2 connections to one backend: a few shared connections, reused by every call.
//!
//! A new connection is opened only when every open one is at the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS (h2 would otherwise queue the stream silently),
//! and only one opener runs at a time, so a burst of calls cannot open a connection each
//! (pingora's ProxyHttp opened 12–24 per backend that way). Each connection's driver task
//! publishes the peer's current stream limit and removes the connection when it ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use super::leg::Sender;
use super::upstream_io::UpstreamIo;
use super::{driver, H2Settings, UpstreamPolicy};

/// Why no stream could be had from a backend. None of these reached the backend's application,
/// so each may be retried elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {source}")]
    Refused {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: h2::Error },
    #[error("connect to {addr} failed moments ago (a concurrent attempt)")]
    JustFailed { addr: String },
}

/// The connections to one backend. Cloning shares them.
#[derive(Debug, Default, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug, Default)]
pub(super) struct PoolInner {
    connections: ArcSwap<Vec<Arc<Connection>>>,
    /// Held while a connection is being opened: concurrent callers wait for it, then share it.
    opening: tokio::sync::Mutex<()>,
    /// Failed connects so far. A caller that waited on `opening` while one failed fails too,
    /// instead of queueing another connect timeout behind it.
    connect_failures: AtomicUsize,
}

#[derive(Debug)]
pub(super) struct Connection {
    sender: Sender,
    /// Streams open on it, counted by us: h2 does not say when the peer's limit is reached.
    /// Shared with the connection's `CoalescingIo` and its driver.
    streams: Arc<AtomicUsize>,
    /// Streams lent on it so far; the driver reads it to tell an idle connection from a busy
    /// one between its ticks.
    lends: Arc<AtomicUsize>,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, published by the driver task.
    pub(super) max_streams: AtomicUsize,
    /// Set by the driver task when the connection ended, or by a caller that saw it fail.
    pub(super) closed: AtomicBool,
    /// A second handle on the socket (a dup), to look for the peer's FIN or RST before an idle
    /// connection is lent: the driver task may not have run since the peer closed it.
    probe: std::net::TcpStream,
}

impl Connection {
    /// True when the peer has shut the socket (FIN or RST), even with bytes still unread
    /// before it. The lean leg's state knows once its task has read the FIN; otherwise one
    /// `poll` with a zero timeout, taken only when lending a connection that had no stream in
    /// flight, so a busy connection pays nothing. Without the `poll`, a call could land on a
    /// connection whose FIN the runtime had not seen yet: it is then lost and retried, but the
    /// loss counts against the backend, and with the failed connects of a restart it can eject
    /// the backend for `base_ejection_time` (docs/architecture.md, "An HTTP/2 path built for
    /// proxying").
    fn peer_closed(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        #[cfg(feature = "lean-upstream")]
        if self.sender.is_closed() {
            return true;
        }
        let gone = PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR;
        let mut probe = [PollFd::new(&self.probe, gone)];
        match poll(&mut probe, Some(&Timespec::default())) {
            Ok(0) => false,
            Ok(_) => probe[0].revents().intersects(gone),
            // Cannot tell: lend it, as before the probe; a failure then shows on the stream.
            Err(_) => false,
        }
    }

    /// A sender and the slot it holds; the caller has already counted the slot in `streams`.
    fn lend(self: &Arc<Self>) -> (Sender, StreamSlot) {
        self.lends.fetch_add(1, Ordering::Relaxed);
        (
            self.sender.clone(),
            StreamSlot {
                connection: Arc::clone(self),
            },
        )
    }
}

/// Streams we put on one connection even if the peer allows more: beyond this, a second
/// connection spreads the load over another socket (and another backend worker thread).
pub(super) const STREAMS_PER_CONNECTION_CAP: usize = 1000;

/// A stream slot on a connection; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamSlot {
    connection: Arc<Connection>,
}

impl StreamSlot {
    /// The connection failed to open a stream (GOAWAY, closed): stop handing it out.
    pub fn mark_broken(&self) {
        self.connection.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.connection.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new() -> Pool {
        Pool::default()
    }

    /// Open connections (for `/backends`).
    pub fn connections(&self) -> usize {
        self.inner.connections.load().len()
    }

    /// Lends no more streams on the open connections (they were made under settings that
    /// changed, such as the cluster's TLS): streams in flight finish on them, then they
    /// close; the next call opens a new connection.
    pub fn retire_connections(&self) {
        let retired = self.inner.connections.swap(Arc::new(Vec::new()));
        for connection in retired.iter() {
            connection.closed.store(true, Ordering::Relaxed);
        }
    }

    /// A stream slot on an open connection, if one has room: the common case, and
    /// synchronous. [`Pool::acquire`] also opens a connection when none has.
    pub fn try_lend(&self) -> Option<(Sender, StreamSlot)> {
        self.inner.try_reserve()
    }

    /// Lends a ready stream sender on a connection with a free stream slot, opening a
    /// connection if none has one. `policy.connect_timeout` bounds the connect and handshake;
    /// the call's deadline is the caller's to race (one timer owns it, so the outcome of a
    /// deadline that passes while connecting does not depend on which timer fires first).
    pub async fn acquire(
        &self,
        addr: &str,
        policy: &UpstreamPolicy,
        settings: &H2Settings,
    ) -> Result<(Sender, StreamSlot), ConnectError> {
        let connect_timeout = policy.connect_timeout;
        if let Some(lent) = self.inner.try_reserve() {
            return Ok(lent);
        }
        let failures_before = self.inner.connect_failures.load(Ordering::Relaxed);
        let _opening = self.inner.opening.lock().await;
        // Another caller may have opened one while we waited, or failed to.
        if let Some(lent) = self.inner.try_reserve() {
            return Ok(lent);
        }
        if self.inner.connect_failures.load(Ordering::Relaxed) != failures_before {
            return Err(ConnectError::JustFailed {
                addr: addr.to_string(),
            });
        }
        let connected = tokio::time::timeout(connect_timeout, connect(addr, policy, settings))
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Timeout {
                    addr: addr.to_string(),
                    timeout: connect_timeout,
                })
            });
        let connected = connected.inspect_err(|_| {
            self.inner.connect_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        let streams = Arc::clone(&connected.streams);
        let lends = Arc::new(AtomicUsize::new(0));
        let connection = Arc::new(Connection {
            sender: connected.sender,
            streams: connected.streams,
            lends: Arc::clone(&lends),
            max_streams: AtomicUsize::new(STREAMS_PER_CONNECTION_CAP),
            closed: AtomicBool::new(false),
            probe: connected.probe,
        });
        // The driver holds the connection weakly: once the pool and every lent slot let go
        // of it (the backend left discovery), its sender drops and h2 closes the connection.
        tokio::spawn(driver::drive(
            connected.upstream,
            Arc::downgrade(&connection),
            Arc::downgrade(&self.inner),
            driver::Use { streams, lends },
            policy.clone(),
        ));
        let lent = connection.lend();
        self.inner.connections.rcu(|current| {
            let mut next: Vec<_> = current
                .iter()
                .filter(|c| !c.closed.load(Ordering::Relaxed))
                .cloned()
                .collect();
            next.push(Arc::clone(&connection));
            next
        });
        Ok(lent)
    }
}

impl PoolInner {
    fn try_reserve(&self) -> Option<(Sender, StreamSlot)> {
        let connections = self.connections.load();
        for connection in connections.iter() {
            if connection.closed.load(Ordering::Relaxed) {
                continue;
            }
            let max = connection.max_streams.load(Ordering::Relaxed);
            let reserved =
                connection
                    .streams
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < max).then_some(n + 1)
                    });
            match reserved {
                // Idle until now: the peer may have closed it while nothing watched.
                Ok(0) if connection.peer_closed() => {
                    connection.closed.store(true, Ordering::Relaxed);
                    connection.streams.fetch_sub(1, Ordering::Relaxed);
                }
                Ok(_) => return Some(connection.lend()),
                Err(_) => {}
            }
        }
        None
    }

    /// Takes a connection that ended out of the pool.
    pub(super) fn remove(&self, gone: &Weak<Connection>) {
        self.connections.rcu(|current| {
            current
                .iter()
                .filter(|c| !std::ptr::eq(Arc::as_ptr(c), gone.as_ptr()))
                .cloned()
                .collect::<Vec<_>>()
        });
    }
}

#[cfg(not(feature = "lean-upstream"))]
pub(super) type Upstream =
    h2::client::Connection<super::coalesce::CoalescingIo<UpstreamIo>, bytes::Bytes>;
#[cfg(feature = "lean-upstream")]
pub(super) type Upstream = super::lean::Connection<UpstreamIo>;

/// A new connection: what calls send on, what the driver task polls, the stream count they
/// share, and the probe.
struct Connected {
    sender: Sender,
    upstream: Upstream,
    streams: Arc<AtomicUsize>,
    probe: std::net::TcpStream,
}

async fn connect(
    addr: &str,
    policy: &UpstreamPolicy,
    settings: &H2Settings,
) -> Result<Connected, ConnectError> {
    let refused = |source| ConnectError::Refused {
        addr: addr.to_string(),
        source,
    };
    let tcp = TcpStream::connect(addr).await.map_err(refused)?;
    // Small frames (HEADERS, WINDOW_UPDATE) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let probe = std::os::fd::AsFd::as_fd(&tcp)
        .try_clone_to_owned()
        .map_err(refused)?;
    let io = match &policy.tls {
        None => UpstreamIo::Plain(tcp),
        Some(tls) => {
            let stream = tls.connect(addr, tcp).await;
            let stream = stream.map_err(|source| ConnectError::Tls {
                addr: addr.to_string(),
                source,
            })?;
            UpstreamIo::Tls(Box::new(stream))
        }
    };
    // One: the stream slot lent to the caller that opens the connection.
    let streams = Arc::new(AtomicUsize::new(1));
    let (sender, upstream) =
        handshake(io, settings, &streams)
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: addr.to_string(),
                source,
            })?;
    Ok(Connected {
        sender,
        upstream,
        streams,
        probe: probe.into(),
    })
}

/// The HTTP/2 client handshake on a new connection, with sluice's windows and frame size.
#[cfg(not(feature = "lean-upstream"))]
async fn handshake(
    io: UpstreamIo,
    settings: &H2Settings,
    streams: &Arc<AtomicUsize>,
) -> Result<(Sender, Upstream), h2::Error> {
    h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.upstream_connection_window)
        .max_frame_size(settings.max_frame_size)
        .handshake::<_, bytes::Bytes>(super::coalesce::CoalescingIo::new(io, Arc::clone(streams)))
        .await
}

/// The lean leg writes its preface on the connection task's first poll: nothing to await,
/// and no coalescing layer, as its task writes every stream's frames in one go.
#[cfg(feature = "lean-upstream")]
async fn handshake(
    io: UpstreamIo,
    settings: &H2Settings,
    _streams: &Arc<AtomicUsize>,
) -> Result<(Sender, Upstream), h2::Error> {
    let local = super::lean::Local {
        stream_window: settings.stream_window,
        connection_window: settings.upstream_connection_window,
        max_frame_size: settings.max_frame_size,
    };
    Ok(super::lean::handshake(io, local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    type Accepted = h2::server::Connection<TcpStream, bytes::Bytes>;

    /// A cluster's policy with the config's defaults.
    fn policy() -> UpstreamPolicy {
        let yaml = "listeners: [{name: l, address: \"127.0.0.1:1\"}]\nclusters: [{name: c, discovery: {static: [\"a:1\"]}}]";
        let config = crate::config::Config::parse(yaml, "t").unwrap();
        UpstreamPolicy::of(&config.clusters[0], None)
    }

    /// A real h2 server that hands each connection, once handshaken, to the test, so the test
    /// decides when the peer closes it.
    async fn server() -> (String, mpsc::UnboundedReceiver<Accepted>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (accepted, connections) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(connection) = h2::server::handshake(tcp).await else {
                    continue;
                };
                if accepted.send(connection).is_err() {
                    return;
                }
            }
        });
        (addr, connections)
    }

    /// One thread, and no await between the peer's close and the next acquire: the
    /// connection's driver task cannot have read the EOF, only the probe can see it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_peer_closed_is_not_lent_again() {
        let (addr, mut connections) = server().await;
        let pool = Pool::new();
        let (policy, settings) = (policy(), H2Settings::default());
        let (_, slot) = pool.acquire(&addr, &policy, &settings).await.unwrap();
        // Held, so a new connection cannot reuse its address.
        let first = Arc::clone(&slot.connection);
        let peer = connections.recv().await.unwrap();
        drop(slot);
        // The peer goes away with bytes (our SETTINGS ack) unread: the kernel resets.
        drop(peer);
        let (_, slot) = pool.acquire(&addr, &policy, &settings).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &slot.connection));
        assert!(
            connections.recv().await.is_some(),
            "a second connection was opened"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_live_connection_is_reused() {
        let (addr, mut connections) = server().await;
        let pool = Pool::new();
        let (policy, settings) = (policy(), H2Settings::default());
        let (_, slot) = pool.acquire(&addr, &policy, &settings).await.unwrap();
        let first = Arc::clone(&slot.connection);
        let _peer = connections.recv().await.unwrap();
        drop(slot);
        let (_, slot) = pool.acquire(&addr, &policy, &settings).await.unwrap();
        assert!(Arc::ptr_eq(&first, &slot.connection));
    }
}
