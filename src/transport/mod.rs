//! Upstream HTTP/2 connections to backends, and the HTTP/2 settings both sides use.
//!
//! [`pool::Pool`] keeps a few shared connections per backend address and lends stream slots on
//! them; [`coalesce::CoalescingIo`] batches small writes on any HTTP/2 connection. Upstream TLS
//! and keepalive belong here too, when they are built.

pub mod coalesce;
mod driver;
pub mod ping_watch;
pub mod pool;
pub mod tls;
mod upstream_io;

use std::time::Duration;

pub use pool::{ConnectError, Pool, StreamSlot};

/// How sluice treats its connections to one cluster's backends (the cluster's config).
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// TLS to the backends (`clusters[].tls`); `None`: cleartext HTTP/2.
    pub tls: Option<std::sync::Arc<tls::ClientTls>>,
    /// Bounds the TCP connect plus the HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// A PING goes out on each connection this often...
    pub keepalive_interval: Duration,
    /// ...and a connection whose PING is unanswered this long is closed.
    pub keepalive_timeout: Duration,
    /// A connection without a stream this long is closed.
    pub idle_timeout: Duration,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        UpstreamPolicy {
            tls: None,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// HTTP/2 settings for both sides. Windows are larger than the 64 KiB default so one stream
/// can move a 16 MiB message at loopback speed; receive capacity is released only as bytes
/// are forwarded (`proxy::forward`), so memory stays bounded by these windows.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS we advertise to clients.
    pub max_concurrent_streams: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_frame_size: 16 * 1024,
            max_concurrent_streams: 10_000,
        }
    }
}
