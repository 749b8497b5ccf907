//! A fleet of sluice instances sharing their overrides through etcd.
//!
//! - The overrides are one JSON value at `OVERRIDES_PREFIX/current` (an [`OverrideSet`]).
//!   A change reads it, applies the change, and writes it back only if nobody wrote in between
//!   (a transaction on its `mod_revision`), so two operators never undo each other. Its
//!   `mod_revision` is the overrides' revision.
//! - Every instance watches that key and applies each new value ([`Fleet`]), and starts with
//!   the value in force, so a restarted instance starts with the fleet's drains.
//! - Every instance registers at `FLEET_PREFIX/ID` under a lease ([`Registration`]): its id,
//!   admin address, config hash, and the overrides revision it applied. `sluice ctl status`
//!   reads them, and `fleet_wide` rate limits divide by how many there are.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use tokio::time::timeout;
use tracing::{info, warn};

use super::{Changed, Steering};
use crate::discovery::etcd::{self as etcd, ClientConfig};
use crate::overrides::{Change, ChangeRecord, OverrideSet};
use crate::pace::Backoff;

/// Each etcd request gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The registration's lease: an instance that dies leaves the registry this long after.
pub const LEASE_TTL_SECONDS: i64 = 10;
/// How often the registration is refreshed, re-written after a new revision, and the live
/// instances counted.
const TICK: Duration = Duration::from_secs(1);
/// Attempts at a change that keeps meeting another writer's.
const CHANGE_ATTEMPTS: usize = 10;

/// This machine's name: the default instance id's first part, and who made a change with
/// `sluice ctl`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The key holding a fleet's overrides under `prefix`.
pub fn overrides_key(prefix: &str) -> String {
    format!("{prefix}/current")
}

/// Where changes are written: the overrides' key in etcd. Connects for each change, which
/// is rare, so an etcd away at start-up delays nothing.
pub struct Store {
    pub etcd: ClientConfig,
    pub key: String,
}

impl Store {
    pub fn new(etcd: ClientConfig, prefix: &str) -> Store {
        Store {
            etcd,
            key: overrides_key(prefix),
        }
    }

    /// Writes a change; `Changed::Fleet` carries the revision it was written at.
    pub async fn change(&self, change: &Change, record: ChangeRecord) -> Result<Changed, String> {
        let mut client = etcd::connect(&self.etcd).await?;
        write_change(&mut client, &self.key, change, record).await
    }
}

/// Reads the overrides, applies `change`, and writes them back unless someone else wrote in
/// between (then it tries again). Also what `sluice ctl --etcd` runs.
pub async fn write_change(
    client: &mut Client,
    key: &str,
    change: &Change,
    record: ChangeRecord,
) -> Result<Changed, String> {
    for _ in 0..CHANGE_ATTEMPTS {
        let (mut set, revision) = read(client, key).await?;
        if !set.apply(change) {
            return Ok(Changed::Nothing);
        }
        set.last_change = Some(record.clone());
        let value = serde_json::to_string(&set).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key, value, None)]);
        let done = timeout(REQUEST_TIMEOUT, client.txn(txn))
            .await
            .map_err(|_| "etcd did not answer in time".to_string())?
            .map_err(|e| format!("etcd: {e}"))?;
        if done.succeeded() {
            let written = done.header().map_or(0, |h| h.revision());
            return Ok(Changed::Fleet(written));
        }
    }
    Err("another writer kept changing the overrides; try again".into())
}

/// The overrides at `key` and their revision (`mod_revision`; 0 when there are none yet).
pub async fn read(client: &mut Client, key: &str) -> Result<(OverrideSet, i64), String> {
    let got = timeout(REQUEST_TIMEOUT, client.get(key, None))
        .await
        .map_err(|_| "etcd did not answer in time".to_string())?
        .map_err(|e| format!("etcd: {e}"))?;
    let Some(kv) = got.kvs().first() else {
        return Ok((OverrideSet::default(), 0));
    };
    let set = serde_json::from_slice(kv.value())
        .map_err(|e| format!("{key}: not a sluice overrides value: {e}"))?;
    Ok((set, kv.mod_revision()))
}

/// What an instance says of itself in the fleet registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub id: String,
    /// The admin endpoint's address, if it has one.
    pub admin: Option<String>,
    /// FNV-1a of its expanded config as last loaded (start or reload), in hex: instances with
    /// the same hash run the same file.
    pub config_hash: String,
    /// The overrides revision it has applied.
    pub override_revision: u64,
    pub version: String,
    pub pid: u32,
}

/// The background service of a fleet member: applies the fleet's overrides as they change,
/// and keeps its registration alive.
pub struct Fleet {
    pub steering: Arc<Steering>,
    pub etcd: ClientConfig,
    /// `overrides.etcd_prefix`, when overrides are shared.
    pub overrides_prefix: Option<String>,
    /// `fleet.etcd_prefix` and this instance's registration, when it registers.
    pub registry: Option<(String, Registration)>,
}

#[async_trait]
impl BackgroundService for Fleet {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let overrides = async {
            if let Some(prefix) = &self.overrides_prefix {
                self.follow_overrides(prefix).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let registry = async {
            if let Some((prefix, me)) = &self.registry {
                self.stay_registered(prefix, me).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = overrides => {}
            _ = registry => {}
            _ = shutdown.changed() => {}
        }
        if let Some((prefix, me)) = &self.registry {
            self.leave(prefix, me).await;
        }
    }
}

impl Fleet {
    /// Lists the overrides, applies them, then applies each change the watch brings; on any
    /// failure, connects again with backoff and lists again.
    async fn follow_overrides(&self, prefix: &str) {
        let key = overrides_key(prefix);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if let Err(error) = self.follow_once(&key).await {
                let wait = backoff.next_wait();
                warn!(%error, %key, retry_in = ?wait, "fleet overrides: lost etcd; the overrides in force stay");
                tokio::time::sleep(wait).await;
            } else {
                backoff.reset();
            }
        }
    }

    async fn follow_once(&self, key: &str) -> Result<(), String> {
        let mut client = etcd::connect(&self.etcd).await?;
        let (set, revision) = read(&mut client, key).await?;
        self.take(set, revision);
        self.steering.set_loaded();
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = timeout(REQUEST_TIMEOUT, client.watch(key, Some(options)))
            .await
            .map_err(|_| "watch set-up timed out".to_string())?
            .map_err(|e| format!("watch: {e}"))?;
        loop {
            let response = stream
                .message()
                .await
                .map_err(|e| format!("watch: {e}"))?
                .ok_or("etcd ended the watch")?;
            if response.canceled() {
                return Err(format!("watch canceled: {}", response.cancel_reason()));
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Delete => self.take(OverrideSet::default(), kv.mod_revision()),
                    EventType::Put => match serde_json::from_slice(kv.value()) {
                        Ok(set) => self.take(set, kv.mod_revision()),
                        Err(error) => {
                            warn!(%error, key, "fleet overrides: a value sluice cannot read; the overrides in force stay")
                        }
                    },
                }
            }
        }
    }

    /// Applies the fleet's set, read at `revision`.
    fn take(&self, set: OverrideSet, revision: i64) {
        let overrides = &self.steering.overrides;
        if overrides.revision() == revision as u64 && *overrides.current() == set {
            return;
        }
        if let Some(change) = &set.last_change {
            info!(revision, change = %change.what, by = %change.by, at = %change.at,
                "fleet override applied");
        } else {
            info!(revision, "fleet overrides applied");
        }
        overrides.replace(set, revision.max(0) as u64);
        self.steering.apply();
    }

    /// Registers under a lease and keeps it alive; re-writes the registration when the
    /// applied revision moves; counts the live instances. Starts over on any failure.
    async fn stay_registered(&self, prefix: &str, me: &Registration) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let error = self.registered_once(prefix, me).await;
            let wait = backoff.next_wait();
            warn!(%error, retry_in = ?wait, "fleet registration lost; registering again");
            tokio::time::sleep(wait).await;
        }
    }

    async fn registered_once(&self, prefix: &str, me: &Registration) -> String {
        let mut client = match etcd::connect(&self.etcd).await {
            Ok(client) => client,
            Err(error) => return error,
        };
        let lease =
            match timeout(REQUEST_TIMEOUT, client.lease_grant(LEASE_TTL_SECONDS, None)).await {
                Ok(Ok(granted)) => granted.id(),
                Ok(Err(error)) => return format!("lease grant: {error}"),
                Err(_) => return "lease grant timed out".into(),
            };
        let (mut keeper, mut answers) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(error) => return format!("keep-alive: {error}"),
        };
        let key = format!("{prefix}/{}", me.id);
        let mut written = None;
        loop {
            let now = (
                self.steering.overrides.revision(),
                self.steering.config_hash.load(Ordering::Relaxed),
            );
            if written != Some(now) {
                if let Err(error) = write(&mut client, &key, me, now, lease).await {
                    return error;
                }
                if written.is_none() {
                    info!(%key, "registered in the fleet");
                }
                written = Some(now);
            }
            if let Err(error) = keeper.keep_alive().await {
                return format!("keep-alive: {error}");
            }
            match timeout(REQUEST_TIMEOUT, answers.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return "the lease expired".into(),
                Ok(Ok(None)) => return "etcd closed the keep-alive stream".into(),
                Ok(Err(error)) => return format!("keep-alive: {error}"),
                Err(_) => return "no keep-alive answer in time".into(),
            }
            if let Some(live) = count(&mut client, prefix).await {
                self.steering.set_instances(live);
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Deletes the registration at shutdown, so the fleet sees the instance leave at once.
    async fn leave(&self, prefix: &str, me: &Registration) {
        let key = format!("{prefix}/{}", me.id);
        if let Ok(mut client) = etcd::connect(&self.etcd).await {
            let _ = timeout(REQUEST_TIMEOUT, client.delete(key.as_str(), None)).await;
            info!(%key, "left the fleet");
        }
    }
}

/// Writes this instance's registration, at `(override revision, config hash)`, under `lease`.
async fn write(
    client: &mut Client,
    key: &str,
    me: &Registration,
    (revision, config_hash): (u64, u64),
    lease: i64,
) -> Result<(), String> {
    let registration = Registration {
        override_revision: revision,
        config_hash: format!("{config_hash:016x}"),
        ..me.clone()
    };
    let value = serde_json::to_string(&registration).unwrap_or_default();
    let options = PutOptions::new().with_lease(lease);
    match timeout(REQUEST_TIMEOUT, client.put(key, value, Some(options))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("put {key}: {error}")),
        Err(_) => Err(format!("put {key} timed out")),
    }
}

/// The instances registered under `prefix` now (at least 1: this one), or `None` if etcd did
/// not answer.
async fn count(client: &mut Client, prefix: &str) -> Option<usize> {
    let options = GetOptions::new().with_prefix().with_count_only();
    let counted = timeout(
        REQUEST_TIMEOUT,
        client.get(format!("{prefix}/"), Some(options)),
    )
    .await;
    let counted = counted.ok()?.ok()?;
    Some(counted.count().max(1) as usize)
}

/// The fleet's instances, as `sluice ctl status` lists them: each registration, and the
/// overrides' revision now.
pub async fn instances(
    client: &mut Client,
    fleet_prefix: &str,
    overrides_prefix: Option<&str>,
) -> Result<(Vec<Registration>, Option<i64>), String> {
    let listed = timeout(
        REQUEST_TIMEOUT,
        client.get(
            format!("{fleet_prefix}/"),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await
    .map_err(|_| "etcd did not answer in time".to_string())?
    .map_err(|e| format!("etcd: {e}"))?;
    let mut instances: Vec<Registration> = (listed.kvs().iter())
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let revision = match overrides_prefix {
        Some(prefix) => Some(read(client, &overrides_key(prefix)).await?.1),
        None => None,
    };
    Ok((instances, revision))
}
