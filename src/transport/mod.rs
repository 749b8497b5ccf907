//! Upstream HTTP/2 connections to backends, and the HTTP/2 settings both sides use.
//!
//! [`pool::Pool`] keeps a few shared connections per backend address and lends stream slots on
//! them; [`coalesce::CoalescingIo`] batches small writes on any HTTP/2 connection; `tls.rs`
//! builds TLS for both legs, and the driver keeps each backend connection alive.

pub mod coalesce;
mod driver;
#[cfg(feature = "lean-upstream")]
mod lean;
pub mod leg;
pub mod pool;
pub mod tls;
mod upstream_io;

use std::time::Duration;

use crate::config::{ClusterConfig, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_HEADER_LIST_SIZE};

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

impl UpstreamPolicy {
    /// A cluster's policy: its config (whose defaults are the only ones), and its TLS.
    pub fn of(config: &ClusterConfig, tls: Option<std::sync::Arc<tls::ClientTls>>) -> Self {
        UpstreamPolicy {
            tls,
            connect_timeout: config.connect_timeout.0,
            keepalive_interval: config.upstream_keepalive.interval.0,
            keepalive_timeout: config.upstream_keepalive.timeout.0,
            idle_timeout: config.upstream_idle_timeout.0,
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
    /// The connection window sluice opens to each backend. Far larger than `stream_window`:
    /// many calls share one backend connection, and bytes a call cannot yet forward (its
    /// client reads slowly, or not at all) hold their share of the connection window until
    /// they are forwarded. With the client-side window here, four stalled calls would stop
    /// every other call on that backend connection; with this one it takes 64.
    pub upstream_connection_window: u32,
    pub max_frame_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS we advertise to clients.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE we advertise to clients, and enforce: a larger request
    /// header block gets its stream refused (431 semantics), and h2 closes a connection whose
    /// header block keeps coming in CONTINUATION frames past about 1.25 × this.
    pub max_header_list_size: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            upstream_connection_window: 64 << 20,
            max_frame_size: 16 * 1024,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
        }
    }
}
