//! Discovery sources push whole backend sets into clusters ([`Cluster::update`]).
//!
//! A closed set, one file each: `static` lists come from the config. etcd comes with its own
//! issue; its config key is rejected as "not supported yet" until then.

mod static_list;

use crate::balance::Cluster;
use crate::config::ClusterConfig;

/// Starts feeding `cluster` from the source its config names.
pub fn start(cluster: &Cluster, config: &ClusterConfig) {
    if let Some(list) = &config.discovery.static_ {
        static_list::apply(cluster, list);
    }
}
