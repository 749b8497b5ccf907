//! The listening sockets. sluice binds them itself and hands them to pingora through the same
//! table of listening file descriptors that a graceful upgrade fills. So a bad address is one
//! clear error before anything starts (pingora would panic in a service thread), port 0 works,
//! and the address actually bound is known and logged. In an upgrade the sockets come from the
//! old process instead, by address.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::listening::Service as ListeningService;
use pingora_core::services::Service;
use socket2::{Domain, Socket, Type};

use crate::BoxError;

/// pingora's own backlog for the sockets it binds.
const BACKLOG: i32 = 65_535;

/// Whether pingora buffers reads and writes on accepted connections.
pub(super) enum BufferL4 {
    /// pingora's default (the admin endpoint's HTTP/1).
    Yes,
    /// Off: h2 does its own buffering, and the extra copy cost ~10% on 64 KiB messages
    /// (docs/architecture.md, "Candidates compared").
    No,
}

/// A pingora listening service over one socket sluice bound (or, in an upgrade, one the old
/// process hands over).
pub(super) struct Listening<A> {
    inner: ListeningService<A>,
    /// The socket, and the key pingora finds it under; `None` in an upgrade.
    socket: Option<(String, TcpListener)>,
}

impl<A: ServerApp + Send + Sync + 'static> Listening<A> {
    /// Binds `address` (unless `upgrade`) and prepares the service; returns it with the
    /// address bound. `what` names the listener in errors.
    pub(super) fn bind(
        name: String,
        app: A,
        address: SocketAddr,
        upgrade: bool,
        what: &str,
        buffer: BufferL4,
    ) -> Result<(Listening<A>, SocketAddr), BoxError> {
        let (socket, bound) = if upgrade {
            (None, address)
        } else {
            let listener = bind_socket(address)
                .map_err(|e| format!("{what}: cannot listen on {address}: {e}"))?;
            let bound = listener.local_addr()?;
            (Some((bound.to_string(), listener)), bound)
        };
        let mut inner = ListeningService::new(name, app);
        let endpoint = ListenerConfig::tcp(bound.to_string());
        inner.add_listener(match buffer {
            BufferL4::Yes => endpoint,
            BufferL4::No => endpoint.l4_buffer(L4BufferSettings::unbuffered()),
        });
        Ok((Listening { inner, socket }, bound))
    }

    pub(super) fn set_threads(&mut self, threads: usize) {
        self.inner.threads = Some(threads);
    }
}

/// A listening socket as pingora makes its own: SO_REUSEADDR, a large backlog, non-blocking.
fn bind_socket(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> Service for Listening<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let (Some(fds), Some((key, socket))) = (&fds, self.socket.take()) {
            // pingora adopts a socket it finds in this table under its address.
            fds.lock().add(key, socket.into_raw_fd());
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        Service::name(&self.inner)
    }

    fn threads(&self) -> Option<usize> {
        Service::threads(&self.inner)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}
