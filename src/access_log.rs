//! The access log: one JSON line per finished call (SPEC.md "Access log"), on stdout or
//! appended to a file, and the trace id that joins it with the backends' logs.
//!
//! A call formats its line and hands it to a writer thread over a bounded channel, so a slow
//! disk never stalls the data plane. When the channel is full the line is dropped and counted
//! in `sluice_access_log_dropped_total`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use serde::Serialize;
use tracing::error;

use crate::config::AccessLogConfig;
use crate::metrics::metrics;

/// Lines that may wait for the writer; about 16 MiB at a typical 250 bytes a line.
const QUEUE_LINES: usize = 65_536;

/// The longest trace id carried into the log; longer header values are cut.
const MAX_TRACE_ID: usize = 128;

/// Where finished calls are written.
#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: SyncSender<Vec<u8>>,
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
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => metrics().access_log_dropped.inc(),
            // The writer is gone (its destination failed, already logged).
            Err(TrySendError::Disconnected(_)) => metrics().access_log_dropped.inc(),
        }
    }
}

/// The writer thread: buffered writes, flushed whenever the queue runs empty, so a line is
/// out within one write of its call ending.
fn write_lines(queue: Receiver<Vec<u8>>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failing = false;
    while let Ok(line) = queue.recv() {
        let mut result = out.write_all(&line);
        while result.is_ok() {
            match queue.try_recv() {
                Ok(line) => result = out.write_all(&line),
                Err(_) => break,
            }
        }
        // A failed write (a full disk) loses this batch, not the log: the next line tries
        // again. Logged once per streak of failures.
        match result.and_then(|()| out.flush()) {
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

/// The trace id of a call: from `traceparent` (its trace-id field), `x-request-id`,
/// `x-b3-traceid` or `uber-trace-id` (its first field), the first present. When none is,
/// a new `x-request-id` is generated and added to `headers`, so it travels upstream.
pub fn trace_id(headers: &mut HeaderMap) -> String {
    // Each candidate must be non-empty visible ASCII, or the next header is tried.
    let usable = |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic());
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let found = value("traceparent")
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| usable(id))
        .or_else(|| value("x-request-id").filter(|id| usable(id)))
        .or_else(|| value("x-b3-traceid").filter(|id| usable(id)))
        .or_else(|| {
            value("uber-trace-id")
                .and_then(|v| v.split([':', '%']).next())
                .filter(|id| usable(id))
        });
    if let Some(id) = found {
        return id.chars().take(MAX_TRACE_ID).collect();
    }
    let id = new_request_id();
    // A client's own x-request-id, even one unfit for the log, is never replaced.
    if !headers.contains_key("x-request-id") {
        if let Ok(header) = HeaderValue::from_str(&id) {
            headers.insert("x-request-id", header);
        }
    }
    id
}

/// A random UUID (version 4), the shape most services expect in `x-request-id`.
fn new_request_id() -> String {
    let bits = fastrand::u128(..);
    // Version 4, variant 10xx.
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// RFC 3339 UTC with milliseconds, such as `2026-11-27T16:40:00.123Z`.
pub fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn trace_ids_come_from_each_header_kind() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cases = [
            (
                headers(&[("traceparent", traceparent), ("x-request-id", "r")]),
                "4bf92f3577b34da6a3ce929d0e0e4736",
            ),
            (headers(&[("x-request-id", "req-1")]), "req-1"),
            (
                headers(&[("x-b3-traceid", "80f198ee56343ba8")]),
                "80f198ee56343ba8",
            ),
            (
                headers(&[("uber-trace-id", "5b8aa5a2d2c872e8:5b8aa5a2d2c872e8:0:1")]),
                "5b8aa5a2d2c872e8",
            ),
            (
                headers(&[("uber-trace-id", "5b8aa5a2d2c872e8%3A1%3A0%3A1")]),
                "5b8aa5a2d2c872e8",
            ),
        ];
        for (mut map, want) in cases {
            let before = map.len();
            assert_eq!(trace_id(&mut map), want);
            assert_eq!(map.len(), before, "nothing is added when an id is present");
        }
    }

    #[test]
    fn unusable_ids_fall_through_and_a_client_id_is_kept() {
        let mut map = headers(&[("traceparent", "00--x-01"), ("x-b3-traceid", "abc")]);
        assert_eq!(trace_id(&mut map), "abc");
        let mut map = headers(&[("x-request-id", "has space")]);
        let id = trace_id(&mut map);
        assert_ne!(id, "has space");
        assert_eq!(map.get("x-request-id").unwrap(), "has space");
    }

    #[test]
    fn a_missing_trace_id_is_generated_and_forwarded() {
        let mut map = HeaderMap::new();
        let id = trace_id(&mut map);
        assert_eq!(map.get("x-request-id").unwrap(), id.as_str());
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(trace_id(&mut HeaderMap::new()), id);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
