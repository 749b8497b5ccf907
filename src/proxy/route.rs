//! The router: which cluster a call's `:path` goes to.

use std::sync::Arc;

use crate::balance::Cluster;
use crate::config::{Config, RouteMatch};
use crate::telemetry::{Export, Scrape};
use crate::wire::GrpcPath;

/// The clusters, and the routes to them in config order (first match wins). Swapped whole on
/// reload.
#[derive(Debug)]
pub struct Router {
    routes: Vec<(Option<RouteMatch>, Arc<Cluster>)>,
    clusters: Vec<Arc<Cluster>>,
}

impl Router {
    pub fn new(config: &Config, clusters: Vec<Arc<Cluster>>) -> Router {
        let by_name = |name: &str| clusters.iter().find(|c| c.name == name).cloned();
        let routes = match &config.routes {
            Some(routes) => routes
                .iter()
                // Validation guarantees every route names a cluster.
                .filter_map(|r| Some((r.match_.clone(), by_name(&r.cluster.value)?)))
                .collect(),
            None => clusters.iter().map(|c| (None, Arc::clone(c))).collect(),
        };
        Router { routes, clusters }
    }

    /// No clusters, no routes: every call is UNIMPLEMENTED (before a config is loaded).
    pub fn empty() -> Router {
        Router {
            routes: Vec::new(),
            clusters: Vec::new(),
        }
    }

    pub fn clusters(&self) -> &[Arc<Cluster>] {
        &self.clusters
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.name == name)
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

/// The router owns the clusters, so it is what hands them to `/metrics`.
impl Export for Router {
    fn export(&self, scrape: &mut Scrape) {
        for cluster in &self.clusters {
            cluster.export(scrape);
        }
    }
}
