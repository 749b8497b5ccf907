//! What a cluster knows of the source that feeds it backends: which kind, which etcd prefix,
//! and whether it answers. Discovery writes it; `/backends` and `/metrics` read it. The
//! cluster never asks its source anything.

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::DiscoveryConfig;
use crate::sync::lock;

/// Where a cluster's backends come from (the `source` label and field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Static,
    Etcd,
}

impl SourceKind {
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Static => "static",
            SourceKind::Etcd => "etcd",
        }
    }
}

/// Whether the source answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Started, no answer yet.
    Connecting = 0,
    Connected = 1,
    /// Failed since it last answered: the cluster routes on its last known set.
    Unreachable = 2,
}

/// A cluster's discovery source and how it is doing.
#[derive(Debug)]
pub struct SourceStatus {
    pub kind: SourceKind,
    /// The etcd prefix watched, without the trailing slash.
    pub prefix: Option<String>,
    /// A [`SourceState`], as its number.
    state: AtomicU8,
    /// The etcd revision the backend set reflects.
    revision: AtomicI64,
    /// Why the source last failed, kept until it answers again (cold path).
    last_error: Mutex<Option<String>>,
    invalid_values: AtomicI64,
}

/// What `/backends` shows of a cluster's discovery.
#[derive(Debug, Serialize)]
pub struct SourceView {
    pub source: SourceKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    pub state: SourceState,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl SourceStatus {
    pub fn new(config: &DiscoveryConfig) -> SourceStatus {
        let (kind, prefix, state) = match config {
            DiscoveryConfig::Etcd(etcd) => (
                SourceKind::Etcd,
                Some(etcd.prefix.0.clone()),
                SourceState::Connecting,
            ),
            DiscoveryConfig::Static(_) => (SourceKind::Static, None, SourceState::Connected),
        };
        SourceStatus {
            kind,
            prefix,
            state: AtomicU8::new(state as u8),
            revision: AtomicI64::new(0),
            last_error: Mutex::new(None),
            invalid_values: AtomicI64::new(0),
        }
    }

    /// True when `other` names the same source (kind and prefix), so a reload may hand the
    /// backends over.
    pub fn same_source(&self, other: &SourceStatus) -> bool {
        self.kind == other.kind && self.prefix == other.prefix
    }

    pub fn state(&self) -> SourceState {
        match self.state.load(Ordering::Acquire) {
            0 => SourceState::Connecting,
            1 => SourceState::Connected,
            _ => SourceState::Unreachable,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state() == SourceState::Connected
    }

    pub fn set_connected(&self) {
        self.state
            .store(SourceState::Connected as u8, Ordering::Release);
        *lock(&self.last_error) = None;
    }

    pub fn set_failed(&self, error: String) {
        self.state
            .store(SourceState::Unreachable as u8, Ordering::Release);
        *lock(&self.last_error) = Some(error);
    }

    /// Keys under the prefix skipped because their value could not be decoded.
    pub fn invalid_values(&self) -> i64 {
        self.invalid_values.load(Ordering::Relaxed)
    }

    pub fn set_invalid_values(&self, count: usize) {
        self.invalid_values.store(count as i64, Ordering::Relaxed);
    }

    pub fn set_revision(&self, revision: i64) {
        self.revision.store(revision, Ordering::Release);
    }

    pub fn view(&self) -> SourceView {
        let revision = self.revision.load(Ordering::Acquire);
        SourceView {
            source: self.kind,
            prefix: self.prefix.clone(),
            state: self.state(),
            connected: self.is_connected(),
            revision: (revision > 0).then_some(revision),
            last_error: lock(&self.last_error).clone(),
        }
    }
}
