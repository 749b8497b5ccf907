//! The access log: one JSON line per finished call, on stdout or appended to a file (fields in
//! docs/operations.md, "Access log").
//!
//! A call formats its line and hands it to a writer thread over a bounded channel, so a slow
//! disk never stalls the data plane. When the channel is full the line is dropped and counted
//! in `sluice_access_log_dropped_total`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::time::Duration;

use serde::Serialize;
use tracing::error;

use super::metrics::metrics;
use crate::config::AccessLogConfig;

/// Lines that may wait for the writer; about 16 MiB at a typical 250 bytes a line.
const QUEUE_LINES: usize = 65_536;

/// Where finished calls are written.
#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: SyncSender<Queued>,
}

/// What the writer thread is handed.
#[derive(Debug)]
enum Queued {
    Line(Vec<u8>),
    /// Write out what came before, then say so.
    Flush(Sender<()>),
}

/// One finished call, as it is written.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub listener: &'a str,
    pub peer: Option<SocketAddr>,
    pub path: &'a str,
    pub cluster: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub attempts: u32,
    pub grpc_status: u32,
    pub grpc_code: &'static str,
    pub origin: &'static str,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub trace_id: &'a str,
    /// Why sluice answered without a backend's answer, when it did (`Reject::cause`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<&'static str>,
    /// Under mTLS: the client certificate's subject and SANs (`DNS:...`, `URI:...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_sans: Option<Vec<String>>,
    /// `grpc`, `grpc-web` or `grpc-web-text`.
    pub protocol: &'static str,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match &config.path {
            None => Box::new(std::io::stdout()),
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (lines, queue) = sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || write_lines(queue, out))?;
        Ok(AccessLog { lines })
    }

    /// Queues one line; never blocks.
    pub fn write(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        match self.lines.try_send(Queued::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => metrics().access_log_dropped.inc(),
            // The writer is gone (its destination failed, already logged).
            Err(TrySendError::Disconnected(_)) => metrics().access_log_dropped.inc(),
        }
    }

    /// Waits until every line queued so far is written, at most `budget`; false if it was
    /// not (before the process exits on its own, skipping destructors).
    pub fn wait_written(&self, budget: Duration) -> bool {
        let (done, written) = channel();
        self.lines.try_send(Queued::Flush(done)).is_ok() && written.recv_timeout(budget).is_ok()
    }
}

/// The writer thread: buffered writes, flushed whenever the queue runs empty, so a line is
/// out within one write of its call ending.
fn write_lines(queue: Receiver<Queued>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failing = false;
    let mut flushed = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(queued) = next.take() {
            match queued {
                Queued::Line(line) => result = out.write_all(&line),
                Queued::Flush(done) => flushed.push(done),
            }
            if result.is_err() {
                break;
            }
            next = queue.try_recv().ok();
        }
        // A failed write (a full disk) loses this batch, not the log: the next line tries
        // again. Logged once per streak of failures.
        let result = result.and_then(|()| out.flush());
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
        match result {
            Ok(()) => failing = false,
            Err(error) => {
                if !failing {
                    error!(%error, "access log: cannot write; lines are lost until it can again");
                }
                failing = true;
                metrics().access_log_dropped.inc();
                // Start the next batch clean: what is buffered cannot be written now.
                out = std::io::BufWriter::with_capacity(64 * 1024, out.into_parts().0);
            }
        }
    }
}

/// The time a line is written: RFC 3339 UTC with milliseconds, such as
/// `2026-11-27T16:40:00.123Z`.
pub fn now_rfc3339() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    // Formatting a UTC time with this fixed description cannot fail; an empty time field is
    // the harmless fallback.
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let now = now_rfc3339();
        assert_eq!(now.len(), "2026-11-27T16:40:00.123Z".len(), "{now}");
        assert!(now.ends_with('Z') && &now[10..11] == "T", "{now}");
        let parsed =
            time::OffsetDateTime::parse(&now, &time::format_description::well_known::Rfc3339);
        assert!(parsed.is_ok(), "{now}");
    }

    #[test]
    fn wait_written_returns_once_every_queued_line_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let config = AccessLogConfig {
            path: Some(path.display().to_string()),
            enabled: true,
        };
        let log = AccessLog::start(&config).unwrap();
        for i in 0..1000 {
            let line = format!("{{\"n\":{i}}}\n").into_bytes();
            log.lines.try_send(Queued::Line(line)).unwrap();
        }
        assert!(log.wait_written(Duration::from_secs(5)));
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.lines().count(), 1000);
    }
}
