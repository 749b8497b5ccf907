//! The operator's hands on the wheel: runtime overrides (drain, weight, split) applied to the
//! live clusters and routes, locally or, with `overrides.etcd_prefix`, for a whole fleet
//! through etcd ([`fleet`]), where each instance also registers itself.
//!
//! [`Steering`] outlives config generations: a reload builds its clusters and routes with the
//! overrides in force, then applies them once more, so a change made during the reload is not
//! lost.

pub mod fleet;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::balance::Clusters;
use crate::overrides::{Change, ChangeRecord, OverrideSet, Overrides};
use crate::proxy::Router;
use crate::telemetry::access_log::now_rfc3339;
use crate::telemetry::metrics;

/// The overrides, the live routes and clusters they apply to, and the fleet they are shared
/// with, if any.
pub struct Steering {
    pub overrides: Arc<Overrides>,
    /// Live instances in the fleet registry (1 without a fleet): `fleet_wide` rate limits
    /// divide by it.
    pub instances: Arc<AtomicUsize>,
    pub clusters: Arc<ArcSwap<Clusters>>,
    pub router: Arc<ArcSwap<Router>>,
    /// With `overrides.etcd_prefix`: where changes are written, for every instance to read.
    pub store: Option<fleet::Store>,
    /// FNV-1a of the running config's text (set at start and by each reload), which the
    /// fleet registration shows.
    pub config_hash: AtomicU64,
    /// The overrides in force are known: at once for local ones, after the first read from
    /// etcd for a fleet's (`/readyz` waits for it).
    loaded: AtomicBool,
}

/// Why a change was not made.
#[derive(Debug)]
pub enum Refused {
    /// A value out of range (a weight of 0, a split of all zeros).
    Invalid(String),
    /// It names a cluster or a split route the running config does not have.
    Unknown(String),
    /// The fleet's etcd could not be reached or kept changing: try again.
    Unavailable(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Invalid(why) | Refused::Unknown(why) | Refused::Unavailable(why) => {
                f.write_str(why)
            }
        }
    }
}

/// What a change did.
#[derive(Debug)]
pub enum Changed {
    /// Applied here, at this local revision.
    Local(u64),
    /// Written to etcd at this revision; every instance applies it from there.
    Fleet(i64),
    /// It was in force already.
    Nothing,
}

impl Steering {
    pub fn new(clusters: Arc<ArcSwap<Clusters>>, router: Arc<ArcSwap<Router>>) -> Steering {
        Steering {
            overrides: Overrides::new(),
            instances: Arc::new(AtomicUsize::new(1)),
            clusters,
            router,
            store: None,
            config_hash: AtomicU64::new(0),
            loaded: AtomicBool::new(true),
        }
    }

    /// Shares the overrides through etcd: not loaded until the first read.
    pub fn with_store(mut self, store: fleet::Store) -> Steering {
        self.store = Some(store);
        self.loaded = AtomicBool::new(false);
        self
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub(super) fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Checks a change against the running config: the cluster exists (a backend need not be
    /// discovered yet: a drain may come first), the route has a split over these clusters.
    pub fn check(&self, change: &Change) -> Result<(), Refused> {
        change.check().map_err(Refused::Invalid)?;
        match change {
            Change::Drain { cluster, .. }
            | Change::Undrain { cluster, .. }
            | Change::Weight { cluster, .. } => {
                let clusters = self.clusters.load();
                if clusters.by_name(cluster).is_none() {
                    return Err(Refused::Unknown(format!("no cluster is named {cluster:?}")));
                }
            }
            Change::Split { route, weights } => {
                let router = self.router.load();
                let Some(arms) = router.split_clusters(route) else {
                    return Err(Refused::Unknown(format!(
                        "no route named {route:?} has a split"
                    )));
                };
                let named = weights.iter().flat_map(|w| w.keys());
                if let Some(stranger) = named.into_iter().find(|c| !arms.contains(c)) {
                    return Err(Refused::Unknown(format!(
                        "cluster {stranger:?} is not in route {route:?}'s split ({})",
                        arms.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    /// Makes a checked change, by `by` (who asked, for the log and the record).
    pub async fn change(&self, change: &Change, by: &str) -> Result<Changed, Refused> {
        self.check(change)?;
        let record = ChangeRecord {
            by: by.to_string(),
            what: change.to_string(),
            at: now_rfc3339(),
        };
        if let Some(store) = &self.store {
            return store
                .change(change, record)
                .await
                .map_err(Refused::Unavailable);
        }
        if !self.overrides.change(change, record) {
            return Ok(Changed::Nothing);
        }
        let revision = self.overrides.revision();
        info!(change = %change, by, revision, "override applied");
        self.apply();
        Ok(Changed::Local(revision))
    }

    /// Applies the overrides in force to the live clusters and routes; logs and counts those
    /// that name a cluster or route the running config does not have.
    pub fn apply(&self) {
        let set = self.overrides.current();
        let clusters = self.clusters.load();
        for cluster in clusters.all() {
            cluster.reapply_overrides();
        }
        let mut stale = stale_clusters(&set, &clusters);
        stale.extend(self.router.load().apply_overrides(&set));
        for what in &stale {
            warn!(stale = %what, "an override names something the running config does not have; it stays, and applies if that comes back");
        }
        metrics().overrides_applied(self.overrides.revision(), stale.len());
    }

    /// The fleet's live instances, for `fleet_wide` rate limits.
    pub fn set_instances(&self, live: usize) {
        self.instances.store(live.max(1), Ordering::Relaxed);
    }
}

/// Backend overrides whose cluster is not configured.
fn stale_clusters(set: &OverrideSet, clusters: &Clusters) -> Vec<String> {
    (set.backends.keys())
        .filter(|c| clusters.by_name(c).is_none())
        .map(|c| format!("backends of cluster {c}: no cluster of that name"))
        .collect()
}
