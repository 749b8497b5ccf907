//! The router: which cluster a call's `:path` goes to.

use std::sync::Arc;

use crate::balance::{Cluster, Clusters};
use crate::config::{Config, RouteMatch};
use crate::wire::GrpcPath;

/// The routes to one generation's clusters, in config order (first match wins). Swapped
/// whole on reload, with the clusters (`balance::Clusters`).
#[derive(Debug)]
pub struct Router {
    routes: Vec<(Option<RouteMatch>, Arc<Cluster>)>,
}

impl Router {
    pub fn new(config: &Config, clusters: &Clusters) -> Router {
        let routes = match &config.routes {
            Some(routes) => routes
                .iter()
                // Validation guarantees every route names a cluster.
                .filter_map(|r| {
                    let cluster = clusters.by_name(&r.cluster.value)?;
                    Some((r.match_.clone(), Arc::clone(cluster)))
                })
                .collect(),
            None => (clusters.all().iter())
                .map(|c| (None, Arc::clone(c)))
                .collect(),
        };
        Router { routes }
    }

    pub fn route(&self, path: &str) -> Option<&Arc<Cluster>> {
        self.routes.iter().find_map(|(rule, cluster)| {
            let hit = match rule {
                None => true,
                Some(RouteMatch::Service(service)) => {
                    GrpcPath::parse(path).is_some_and(|p| p.service == service.0)
                }
                Some(RouteMatch::Prefix(prefix)) => path.starts_with(prefix.0.as_str()),
            };
            hit.then_some(cluster)
        })
    }
}
