//! Discovery sources push whole backend sets into clusters ([`Cluster::update`]); a cluster
//! never asks its source anything.
//!
//! A closed set, one file each: `static` lists come from the config and are applied once;
//! `etcd` prefixes are watched by a task each ([`etcd`]), decoded by [`formats`]. The watch
//! tasks run on a small runtime the server owns, off the data plane's threads, and stop when
//! the [`Watchers`] handle that started them is dropped (on reload, after the new ones start).

pub mod etcd;
pub mod formats;
mod static_list;

use std::sync::Arc;

use tokio::runtime::Handle;
use tracing::info;

use crate::balance::{Cluster, Endpoint};
use crate::config::{ClusterConfig, Config, DiscoveryConfig};
use crate::sync::AbortOnDrop;

/// Applies a whole backend set to a cluster, with its log line and count.
fn apply(cluster: &Cluster, endpoints: &[Endpoint]) {
    let before = cluster.backends().backends.len();
    if cluster.update(endpoints) {
        info!(
            cluster = %cluster.name,
            source = cluster.source.kind.label(),
            backends = endpoints.len(),
            before,
            "backend set updated"
        );
        cluster.stats.discovery_updated();
    }
}

/// The running watch tasks of one config generation; dropping it stops them.
pub type Watchers = AbortOnDrop;

/// Starts feeding each cluster from the source its config names: a static list at once, an
/// etcd prefix from a watch task spawned on `runtime`.
pub fn start(
    clusters: &[(Arc<Cluster>, &ClusterConfig)],
    config: &Config,
    runtime: &Handle,
) -> Watchers {
    let mut tasks = Vec::new();
    for (cluster, cluster_config) in clusters {
        match &cluster_config.discovery.value {
            DiscoveryConfig::Static(list) => static_list::apply(cluster, list),
            DiscoveryConfig::Etcd(source) => {
                // Validation guarantees the `etcd:` block when a cluster uses etcd.
                let Some(etcd) = &config.etcd else { continue };
                let client = etcd::ClientConfig::new(etcd, config.files.etcd_tls.as_ref());
                let task = etcd::watch(Arc::clone(cluster), client, source.clone());
                tasks.push(runtime.spawn(task));
            }
        }
    }
    AbortOnDrop::new(tasks)
}
