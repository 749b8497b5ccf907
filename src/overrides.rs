//! The operator's runtime overrides: drained backends, backend weights, and split weights.
//!
//! One set for the process, kept across reloads. The admin endpoint changes it in place
//! (`sluice ctl --admin`), or, with `overrides.etcd_prefix`, the fleet's copy in etcd is the
//! truth and every instance replaces its set with what it reads there. The clusters and the
//! router read it when they are built and are told again after each change; the set itself is
//! never on the call path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::steering::MAX_SPLIT_WEIGHT;
use crate::sync::lock;

/// The largest backend weight an override may set (as discovery's weights).
pub const MAX_BACKEND_WEIGHT: u32 = 100;

/// Every override in force. Also the JSON of `GET /overrides` and of the fleet's etcd value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideSet {
    /// Cluster name, then backend address.
    #[serde(default)]
    pub backends: BTreeMap<String, BTreeMap<String, BackendOverride>>,
    /// Route name, then cluster name: that cluster's weight in the route's split.
    #[serde(default)]
    pub splits: BTreeMap<String, BTreeMap<String, u32>>,
    /// The last change: who made it, what it was, and when.
    #[serde(default)]
    pub last_change: Option<ChangeRecord>,
}

/// What the operator set on one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendOverride {
    /// No new calls; calls in flight finish; health checks go on.
    #[serde(default)]
    pub drained: bool,
    /// Replaces the weight discovery gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub by: String,
    pub what: String,
    /// RFC 3339.
    pub at: String,
}

/// One mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Drain {
        cluster: String,
        backend: String,
    },
    Undrain {
        cluster: String,
        backend: String,
    },
    /// `None`: back to the weight discovery gives.
    Weight {
        cluster: String,
        backend: String,
        weight: Option<u32>,
    },
    /// `None`: back to the config's weights.
    Split {
        route: String,
        weights: Option<BTreeMap<String, u32>>,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Drain { cluster, backend } => write!(f, "drain {cluster} {backend}"),
            Change::Undrain { cluster, backend } => write!(f, "undrain {cluster} {backend}"),
            Change::Weight {
                cluster,
                backend,
                weight: Some(w),
            } => write!(f, "weight {cluster} {backend} {w}"),
            Change::Weight {
                cluster, backend, ..
            } => write!(f, "weight {cluster} {backend} default"),
            Change::Split {
                route,
                weights: Some(weights),
            } => {
                let arms: Vec<String> = weights.iter().map(|(c, w)| format!("{c}={w}")).collect();
                write!(f, "split {route} {}", arms.join(" "))
            }
            Change::Split { route, .. } => write!(f, "split {route} default"),
        }
    }
}

impl Change {
    /// Checks the values a change carries, whatever the config (the names are checked
    /// against the running config by the caller).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Change::Weight {
                weight: Some(w), ..
            } if !(1..=MAX_BACKEND_WEIGHT).contains(w) => Err(format!(
                "a backend weight is 1 to {MAX_BACKEND_WEIGHT} (or `default`), not {w}"
            )),
            Change::Split {
                weights: Some(weights),
                ..
            } => {
                if let Some((c, w)) = weights.iter().find(|(_, w)| **w > MAX_SPLIT_WEIGHT) {
                    return Err(format!(
                        "split weight {w} for {c} is above {MAX_SPLIT_WEIGHT}"
                    ));
                }
                if weights.values().all(|w| *w == 0) {
                    return Err("a split needs at least one weight above 0".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl OverrideSet {
    /// Applies a change; returns whether anything changed.
    pub fn apply(&mut self, change: &Change) -> bool {
        let before = self.clone();
        match change {
            Change::Drain { cluster, backend } | Change::Undrain { cluster, backend } => {
                let drained = matches!(change, Change::Drain { .. });
                self.edit_backend(cluster, backend, |o| o.drained = drained);
            }
            Change::Weight {
                cluster,
                backend,
                weight,
            } => self.edit_backend(cluster, backend, |o| o.weight = *weight),
            Change::Split { route, weights } => match weights {
                Some(weights) => {
                    self.splits.insert(route.clone(), weights.clone());
                }
                None => {
                    self.splits.remove(route);
                }
            },
        }
        before.backends != self.backends || before.splits != self.splits
    }

    /// Edits one backend's override, and forgets it once it overrides nothing.
    fn edit_backend(
        &mut self,
        cluster: &str,
        backend: &str,
        edit: impl FnOnce(&mut BackendOverride),
    ) {
        let of_cluster = self.backends.entry(cluster.to_string()).or_default();
        let entry = of_cluster.entry(backend.to_string()).or_default();
        edit(entry);
        if *entry == BackendOverride::default() {
            of_cluster.remove(backend);
        }
        if of_cluster.is_empty() {
            self.backends.remove(cluster);
        }
    }

    pub fn backend(&self, cluster: &str, backend: &str) -> BackendOverride {
        (self.backends.get(cluster))
            .and_then(|b| b.get(backend))
            .copied()
            .unwrap_or_default()
    }
}

/// The process's overrides and the revision they are at: a counter of local changes, or the
/// etcd revision of the fleet's value.
#[derive(Debug, Default)]
pub struct Overrides {
    set: ArcSwap<OverrideSet>,
    revision: AtomicU64,
    /// Serialises local changes (read, change, store).
    writing: Mutex<()>,
}

impl Overrides {
    pub fn new() -> Arc<Overrides> {
        Arc::new(Overrides::default())
    }

    pub fn current(&self) -> Arc<OverrideSet> {
        self.set.load_full()
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Applies a local change; returns whether it changed anything.
    pub fn change(&self, change: &Change, record: ChangeRecord) -> bool {
        let _writing = lock(&self.writing);
        let mut next = OverrideSet::clone(&self.set.load());
        if !next.apply(change) {
            return false;
        }
        next.last_change = Some(record);
        self.set.store(Arc::new(next));
        self.revision.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Takes the fleet's set as read from etcd at `revision`.
    pub fn replace(&self, set: OverrideSet, revision: u64) {
        let _writing = lock(&self.writing);
        self.set.store(Arc::new(set));
        self.revision.store(revision, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(backend: &str) -> Change {
        Change::Drain {
            cluster: "echo".into(),
            backend: backend.into(),
        }
    }

    #[test]
    fn an_override_that_overrides_nothing_is_forgotten() {
        let mut set = OverrideSet::default();
        assert!(set.apply(&drain("a:1")));
        assert!(!set.apply(&drain("a:1")));
        assert!(set.backend("echo", "a:1").drained);
        let undrain = Change::Undrain {
            cluster: "echo".into(),
            backend: "a:1".into(),
        };
        assert!(set.apply(&undrain));
        assert!(set.backends.is_empty());
    }

    #[test]
    fn changes_check_their_values() {
        let weight = |w| Change::Weight {
            cluster: "c".into(),
            backend: "b".into(),
            weight: Some(w),
        };
        assert!(weight(0).check().is_err());
        assert!(weight(101).check().is_err());
        assert!(weight(100).check().is_ok());
        let split = |w: &[(&str, u32)]| Change::Split {
            route: "r".into(),
            weights: Some(w.iter().map(|(c, w)| (c.to_string(), *w)).collect()),
        };
        assert!(split(&[("a", 0), ("b", 0)]).check().is_err());
        assert!(split(&[("a", 95), ("b", 5)]).check().is_ok());
        assert_eq!(
            split(&[("a", 95), ("b", 5)]).to_string(),
            "split r a=95 b=5"
        );
    }

    #[test]
    fn each_local_change_moves_the_revision() {
        let overrides = Overrides::new();
        let record = || ChangeRecord {
            by: "t".into(),
            what: "x".into(),
            at: "now".into(),
        };
        assert!(overrides.change(&drain("a:1"), record()));
        assert!(!overrides.change(&drain("a:1"), record()));
        assert_eq!(overrides.revision(), 1);
        assert!(overrides.current().backend("echo", "a:1").drained);
    }
}
