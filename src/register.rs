//! `sluice register`: keeps one backend registered in etcd for a service that cannot register
//! itself, in the format sluice's discovery (and Go's resolvers) read.
//!
//! The key lives under a lease that this process keeps alive. If the lease is lost (etcd was
//! unreachable for longer than the TTL, or someone revoked it) the backend is registered
//! again under a new lease. SIGINT/SIGTERM delete the key and revoke the lease, so the backend
//! leaves at once instead of a TTL later.

use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::config::{BackendAddr, EtcdEndpoint, EtcdFormat};
use crate::discovery::etcd::{self, ClientConfig};
use crate::discovery::formats;
use crate::pace::Backoff;
use crate::BoxError;

/// The value formats `sluice register` writes (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RegisterFormat {
    /// JSON `{"Op":0,"Addr":...,"Metadata":...}` under `PREFIX/ADDR` (etcd's endpoints.Manager).
    EtcdNaming,
    /// The bare address under `PREFIX/<lease id>` (go-zero).
    Plain,
}

impl From<RegisterFormat> for EtcdFormat {
    fn from(format: RegisterFormat) -> EtcdFormat {
        match format {
            RegisterFormat::EtcdNaming => EtcdFormat::EtcdNaming,
            RegisterFormat::Plain => EtcdFormat::Plain,
        }
    }
}

/// Bounds every single etcd request this command makes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// etcd's own ceiling on a lease TTL (`MaxLeaseTTL`).
const MAX_LEASE_TTL: Duration = Duration::from_secs(9_000_000_000);

/// What to register, from the command line.
#[derive(Debug)]
pub struct Registration {
    pub endpoints: Vec<EtcdEndpoint>,
    /// Without the trailing slash.
    pub prefix: String,
    pub address: BackendAddr,
    pub ttl: Duration,
    pub metadata: Option<Value>,
    /// `EtcdNaming` or `Plain`.
    pub format: EtcdFormat,
}

impl Registration {
    /// Checks and assembles the command-line values; errors name the flag.
    pub fn new(
        etcd: &str,
        prefix: &str,
        address: &str,
        ttl: Duration,
        metadata: Option<&str>,
        format: RegisterFormat,
    ) -> Result<Registration, String> {
        let endpoints = etcd
            .split(',')
            .map(|e| EtcdEndpoint::parse(e.trim()).map_err(|e| format!("--etcd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.iter().any(EtcdEndpoint::is_https) {
            return Err("--etcd: https endpoints are not supported by `register` yet".into());
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(format!(
                "--prefix: {prefix:?} is not a key prefix such as \"services/echo\""
            ));
        }
        let address = BackendAddr::parse(address).map_err(|e| format!("--addr: {e}"))?;
        if ttl < Duration::from_secs(1) || ttl > MAX_LEASE_TTL {
            return Err(format!(
                "--ttl: must be between 1s and {}s (etcd leases count whole seconds)",
                MAX_LEASE_TTL.as_secs()
            ));
        }
        let format = EtcdFormat::from(format);
        let metadata = match metadata {
            None => None,
            Some(_) if format == EtcdFormat::Plain => return Err(
                "--metadata: the plain format has no room for metadata; use --format etcd-naming"
                    .into(),
            ),
            Some(text) => Some(
                serde_json::from_str::<Value>(text)
                    .map_err(|e| format!("--metadata: invalid JSON: {e}"))?,
            ),
        };
        if let Some(m) = &metadata {
            let value = formats::encode(format, &address.0, Some(m));
            formats::decode(format, value.as_bytes())
                .map_err(|e| format!("--metadata: sluice could not read it back: {e}"))?;
        }
        Ok(Registration {
            endpoints,
            prefix: prefix.to_string(),
            address,
            ttl,
            metadata,
            format,
        })
    }

    /// The key for a lease: `PREFIX/ADDR` (etcd-naming, as endpoints.Manager writes it) or
    /// `PREFIX/<lease id>` (plain, as go-zero writes it).
    fn key(&self, lease: i64) -> String {
        match self.format {
            EtcdFormat::Plain => format!("{}/{lease}", self.prefix),
            _ => format!("{}/{}", self.prefix, self.address),
        }
    }

    fn value(&self) -> String {
        formats::encode(self.format, &self.address.0, self.metadata.as_ref())
    }
}

/// Runs `sluice register` until SIGINT or SIGTERM.
pub fn run(registration: Registration) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(register(registration))
}

async fn register(registration: Registration) -> Result<(), BoxError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let etcd = ClientConfig {
        endpoints: registration.endpoints.iter().map(|e| e.0.clone()).collect(),
        credentials: None,
        tls: None,
        dial_timeout: REQUEST_TIMEOUT,
    };
    let mut client = etcd::connect(&etcd).await?;
    let ttl_seconds = registration.ttl.as_secs_f64().ceil() as i64;
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    // A lease given up on (lost on our side while etcd may still hold it): revoked before the
    // next one, so a plain-format key (named after its lease) is not left twice.
    let mut abandoned: Option<i64> = None;
    loop {
        if let Some(lease) = abandoned.take() {
            let _ = timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
        }
        // Signals are watched at every step: whatever was granted or put is removed.
        let lease = tokio::select! {
            granted = grant(&mut client, ttl_seconds) => granted,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        };
        let registered = match lease {
            Ok(lease) => {
                let key = registration.key(lease);
                tokio::select! {
                    put = put(&mut client, &registration, &key, lease) => put.map(|()| (lease, key)),
                    _ = term.recv() => return deregister(&mut client, lease, &key).await,
                    _ = int.recv() => return deregister(&mut client, lease, &key).await,
                }
            }
            Err(error) => Err(error),
        };
        let (lease, key) = match registered {
            Ok(registered) => registered,
            Err(error) => {
                let retry = backoff.next_wait();
                warn!(%error, retry_in = ?retry, "cannot register yet");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
                continue;
            }
        };
        backoff.reset();
        info!(%key, value = %registration.value(), lease = format!("{lease:x}"), ttl_seconds,
            "registered; keeping the lease alive until SIGINT or SIGTERM");
        let lost = tokio::select! {
            lost = keep_alive(&mut client, lease, registration.ttl) => lost,
            _ = term.recv() => return deregister(&mut client, lease, &key).await,
            _ = int.recv() => return deregister(&mut client, lease, &key).await,
        };
        warn!(%key, reason = %lost, "registration lost; registering again");
        abandoned = Some(lease);
    }
}

async fn grant(client: &mut Client, ttl_seconds: i64) -> Result<i64, String> {
    let granted = timeout(REQUEST_TIMEOUT, client.lease_grant(ttl_seconds, None))
        .await
        .map_err(|_| "lease grant timed out".to_string())?
        .map_err(|e| format!("lease grant failed: {e}"))?;
    Ok(granted.id())
}

async fn put(
    client: &mut Client,
    registration: &Registration,
    key: &str,
    lease: i64,
) -> Result<(), String> {
    let put = client.put(
        key,
        registration.value(),
        Some(PutOptions::new().with_lease(lease)),
    );
    timeout(REQUEST_TIMEOUT, put)
        .await
        .map_err(|_| "put timed out".to_string())?
        .map_err(|e| format!("put failed: {e}"))?;
    Ok(())
}

/// Keeps the lease alive, refreshing every third of the TTL. Returns why the registration
/// was lost: etcd reported the lease gone, or no refresh succeeded for a whole TTL.
async fn keep_alive(client: &mut Client, lease: i64, ttl: Duration) -> String {
    let every = (ttl / 3).max(Duration::from_millis(300));
    let mut last_refresh = Instant::now();
    let mut failed_before = false;
    loop {
        let refreshed_before = last_refresh;
        let outcome = refresh_until_error(client, lease, every, &mut last_refresh).await;
        if last_refresh != refreshed_before {
            failed_before = false;
        }
        match outcome {
            Refresh::LeaseGone => return format!("etcd says lease {lease:x} has expired"),
            Refresh::Failed(error) => {
                if last_refresh.elapsed() >= ttl {
                    return format!("no keep-alive succeeded for the whole TTL ({error})");
                }
                // Once per streak: etcd being away for a moment is worth one line, not one
                // a second.
                if failed_before {
                    debug!(%error, "keep-alive failed again; retrying");
                } else {
                    warn!(%error, "keep-alive failed; retrying until the TTL runs out");
                }
                failed_before = true;
                tokio::time::sleep(every.min(Duration::from_secs(1))).await;
            }
        }
    }
}

enum Refresh {
    LeaseGone,
    Failed(String),
}

/// One keep-alive stream, refreshed every `every` until it fails.
async fn refresh_until_error(
    client: &mut Client,
    lease: i64,
    every: Duration,
    last_refresh: &mut Instant,
) -> Refresh {
    let (mut keeper, mut stream) =
        match timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => return Refresh::Failed(error.to_string()),
            Err(_) => return Refresh::Failed("keep-alive stream timed out".into()),
        };
    loop {
        if let Err(error) = keeper.keep_alive().await {
            return Refresh::Failed(error.to_string());
        }
        match timeout(REQUEST_TIMEOUT.min(every * 2), stream.message()).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => *last_refresh = Instant::now(),
            Ok(Ok(Some(_))) => return Refresh::LeaseGone,
            Ok(Ok(None)) => return Refresh::Failed("etcd closed the keep-alive stream".into()),
            Ok(Err(error)) => return Refresh::Failed(error.to_string()),
            Err(_) => return Refresh::Failed("no keep-alive answer in time".into()),
        }
        tokio::time::sleep(every).await;
    }
}

/// Deletes the key and revokes the lease, so the backend leaves now rather than a TTL later.
async fn deregister(client: &mut Client, lease: i64, key: &str) -> Result<(), BoxError> {
    let deleted = timeout(REQUEST_TIMEOUT, client.delete(key, None)).await;
    let revoked = timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
    match (deleted, revoked) {
        (Ok(Ok(_)), Ok(Ok(_))) => {
            info!(%key, "deregistered: key deleted, lease revoked");
            Ok(())
        }
        (deleted, revoked) => Err(format!(
            "deregistering {key}: delete {}, revoke {}; the key goes when its lease expires",
            outcome(deleted),
            outcome(revoked)
        )
        .into()),
    }
}

fn outcome<T>(
    result: Result<Result<T, etcd_client::Error>, tokio::time::error::Elapsed>,
) -> String {
    match result {
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(error)) => format!("failed ({error})"),
        Err(_) => "timed out".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(metadata: Option<&str>, format: RegisterFormat) -> Result<Registration, String> {
        Registration::new(
            "http://127.0.0.1:2379",
            "services/echo/",
            "127.0.0.1:50061",
            Duration::from_secs(10),
            metadata,
            format,
        )
    }

    #[test]
    fn keys_follow_the_go_writers() {
        let r = new(Some(r#"{"weight":3}"#), RegisterFormat::EtcdNaming).unwrap();
        assert_eq!(r.key(7), "services/echo/127.0.0.1:50061");
        assert_eq!(
            r.value(),
            r#"{"Op":0,"Addr":"127.0.0.1:50061","Metadata":{"weight":3}}"#
        );
        let r = new(None, RegisterFormat::Plain).unwrap();
        assert_eq!(r.key(7587), "services/echo/7587");
        assert_eq!(r.value(), "127.0.0.1:50061");
    }

    #[test]
    fn bad_flags_are_named() {
        assert!(new(Some("{"), RegisterFormat::EtcdNaming)
            .unwrap_err()
            .starts_with("--metadata"));
        assert!(new(Some(r#"{"weight":0}"#), RegisterFormat::EtcdNaming)
            .unwrap_err()
            .contains("weight"));
        assert!(new(Some("{}"), RegisterFormat::Plain)
            .unwrap_err()
            .starts_with("--metadata"));
    }
}
