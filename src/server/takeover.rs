//! `run --upgrade`: taking the listening sockets over from the running sluice, with log lines
//! an operator can read. pingora waits for them by trying once a second, six times, and logs
//! an ERROR for every try that finds nothing yet; those lines are held back while sluice says
//! once that it waits, and warns when time runs short.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use pingora_core::server::Server;
use tracing::{info, warn, Metadata};

/// How long pingora waits for the sockets before the process gives up and exits 1: six tries,
/// one second apart (pingora-core's `transfer_fd`).
pub const GIVES_UP_AFTER: Duration = Duration::from_secs(6);

/// Nothing came this long: the operator is warned that the wait is about to end. Half-way
/// between two of pingora's tries, so the warning never races a try that succeeds.
pub const WARN_AFTER: Duration = Duration::from_millis(3_500);

/// Set while this process waits for the sockets: pingora's per-try lines are held back.
static WAITING: AtomicBool = AtomicBool::new(false);

/// pingora's module that receives (and, in the old process, sends) the sockets.
const TRANSFER_TARGET: &str = "pingora_core::server::transfer_fd";

/// Whether a log event is one of pingora's socket-receiving lines while this process waits
/// for the sockets: its per-try ERROR ("No incoming socket transfer, sleep 1s and try again"),
/// and its other receive errors, whose cause its "Bootstrap failed" line repeats (a log
/// filter sees a line's module, not its text). The log filter drops them. The old process's
/// lines, sending the sockets, are never held back; nor is "Bootstrap failed".
pub fn is_waiting_noise(metadata: &Metadata<'_>) -> bool {
    WAITING.load(Ordering::Relaxed) && metadata.target() == TRANSFER_TARGET
}

/// Bootstraps `server`: in an upgrade, waits for the running sluice to hand its sockets over
/// on `upgrade_sock`, saying so once, and warning after `WARN_AFTER`.
pub fn bootstrap(server: &mut Server, upgrade: bool, upgrade_sock: &str) {
    if !upgrade {
        server.bootstrap();
        return;
    }
    info!(upgrade_sock,
        "waiting for the running sluice to hand over its sockets on {upgrade_sock}: send it SIGQUIT");
    WAITING.store(true, Ordering::Relaxed);
    let (done, waited) = mpsc::channel::<()>();
    let sock = upgrade_sock.to_string();
    let warner = std::thread::spawn(move || {
        if waited.recv_timeout(WARN_AFTER) == Err(mpsc::RecvTimeoutError::Timeout) {
            warn!(upgrade_sock = %sock, waited_ms = WARN_AFTER.as_millis() as u64,
                "no sockets from a running sluice yet: send it SIGQUIT now; this process gives up and exits 1 after {} s",
                GIVES_UP_AFTER.as_secs());
        }
    });
    // On failure pingora logs "Bootstrap failed" and exits the process.
    server.bootstrap();
    WAITING.store(false, Ordering::Relaxed);
    drop(done);
    let _ = warner.join();
    info!(
        upgrade_sock,
        "took the listening sockets over from the running sluice"
    );
}
