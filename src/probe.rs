//! `sluice health`: asks a running sluice's admin endpoint for `/healthz` and exits 0 on a 200.
//! It is the container image's HEALTHCHECK, which has no curl or wget to do it.
//!
//! One HTTP/1.1 GET to our own admin endpoint: the status line is all it reads (at most 1 KiB),
//! so an HTTP client crate would add more than it saves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where to ask: `admin` as written in the config. An unspecified address (`0.0.0.0:9901`, what a
/// container listens on) is asked on loopback, where the HEALTHCHECK runs.
pub fn probe_address(admin: &str) -> Result<SocketAddr, String> {
    let mut address: SocketAddr = admin
        .trim()
        .parse()
        .map_err(|_| format!("--admin: {admin:?} is not HOST:PORT, such as 127.0.0.1:9901"))?;
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(address)
}

/// The most of an answer read: its status line is all that matters.
const MAX_STATUS_LINE: usize = 1024;

/// GET `/healthz` within `limit`; Ok when the answer is `200`, else what went wrong.
pub fn check(address: SocketAddr, limit: Duration) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let url = format!("http://{address}/healthz");
    let asked = runtime.block_on(async { tokio::time::timeout(limit, status_line(address)).await });
    let line = match asked {
        Err(_) => return Err(format!("{url}: no answer within {limit:?}")),
        Ok(Err(e)) => return Err(format!("{url}: {e}")),
        Ok(Ok(line)) => line,
    };
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/1.") => Ok(()),
        _ if line.is_empty() => Err(format!("{url}: closed the connection without answering")),
        _ => Err(format!("{url} answered {:?}", truncate(&line, 80))),
    }
}

/// The answer's first line, read until its CRLF, the connection's end or `MAX_STATUS_LINE`.
async fn status_line(address: SocketAddr) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(address).await?;
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 256];
    while answer.len() < MAX_STATUS_LINE && !answer.windows(2).any(|w| w == b"\r\n") {
        match tcp.read(&mut chunk).await? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let line = answer.split(|&b| b == b'\r').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(line).into_owned())
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_asked_on_loopback() {
        assert_eq!(
            probe_address("0.0.0.0:9901").unwrap().to_string(),
            "127.0.0.1:9901"
        );
        assert_eq!(
            probe_address("[::]:9901").unwrap().to_string(),
            "[::1]:9901"
        );
        assert_eq!(
            probe_address("10.1.2.3:80").unwrap().to_string(),
            "10.1.2.3:80"
        );
        let error = probe_address("localhost").unwrap_err();
        assert!(
            error.contains("--admin") && error.contains("localhost"),
            "{error}"
        );
    }
}
