//! The router: which cluster a call goes to. Routes are tried in config order and the first
//! whose match holds wins: the gRPC service or a `:path` prefix, and request metadata. A
//! route sends to one cluster, or draws one per call from a weighted split, at random or, with
//! `hash_on`, by a fixed hash of a header's value (the same on every instance).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use smallvec::SmallVec;

use super::hedge::Hedging;
use super::rate_limit::RateLimiter;
use crate::balance::{Cluster, Clusters};
use crate::config::{Config, HeaderMatch, RouteConfig, RouteMatch};
use crate::overrides::OverrideSet;
use crate::wire::GrpcPath;

/// The routes to one generation's clusters, in config order (first match wins). Swapped
/// whole on reload, with the clusters (`balance::Clusters`).
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
}

/// One route: what it matches and where it sends.
#[derive(Debug)]
pub struct Route {
    /// `routes[].name`, or `routes[i]` for the metrics of an unnamed route.
    pub name: String,
    named: bool,
    rule: Rule,
    target: Target,
    /// The response header that names the chosen cluster (`cluster_header`).
    pub cluster_header: Option<HeaderName>,
    pub rate_limit: Option<RateLimiter>,
    /// `hedging`: a second attempt when the first is slow.
    pub(super) hedging: Option<Arc<Hedging>>,
}

#[derive(Debug, Default)]
struct Rule {
    service: Option<String>,
    prefix: Option<String>,
    headers: Vec<HeaderRule>,
}

#[derive(Debug)]
enum HeaderRule {
    Exact(HeaderName, String),
    Prefix(HeaderName, String),
    Present(HeaderName, bool),
}

#[derive(Debug)]
enum Target {
    One(Arc<Cluster>),
    Split(Split),
}

#[derive(Debug)]
struct Split {
    arms: Vec<Arm>,
    hash_on: Option<HeaderName>,
}

#[derive(Debug)]
struct Arm {
    cluster: Arc<Cluster>,
    /// The config's weight, and the one in force (an operator's override, or the config's).
    configured: u32,
    weight: AtomicU32,
}

impl Router {
    /// The routes of `config` to `clusters`; `instances` is the fleet's live instance count,
    /// which `fleet_wide` rate limits divide by.
    pub fn new(
        config: &Config,
        clusters: &Clusters,
        overrides: &OverrideSet,
        instances: &Arc<AtomicUsize>,
    ) -> Router {
        let routes = match &config.routes {
            Some(routes) => (routes.iter().enumerate())
                .filter_map(|(i, r)| Route::new(i, r, clusters, instances))
                .collect(),
            None => (clusters.all().iter())
                .map(|c| Route::catch_all(Arc::clone(c)))
                .collect(),
        };
        let router = Router { routes };
        router.apply_overrides(overrides);
        router
    }

    /// The first route whose match holds for a call to `path` with these headers.
    pub fn route(&self, path: &str, headers: &HeaderMap) -> Option<&Route> {
        self.routes.iter().find(|r| r.rule.holds(path, headers))
    }

    /// Sets each split's weights from `overrides` (or back to the config's); returns what
    /// the overrides name that this config does not have.
    pub fn apply_overrides(&self, overrides: &OverrideSet) -> Vec<String> {
        let mut stale = Vec::new();
        for (route, weights) in &overrides.splits {
            match self.split(route) {
                None => stale.push(format!("split {route}: no route of that name has a split")),
                Some(split) => stale.extend(
                    (weights.keys())
                        .filter(|c| !split.arms.iter().any(|a| a.cluster.name == **c))
                        .map(|c| format!("split {route}: cluster {c} is not in it")),
                ),
            }
        }
        for route in &self.routes {
            let Target::Split(split) = &route.target else {
                continue;
            };
            let set = route
                .named
                .then(|| overrides.splits.get(&route.name))
                .flatten();
            for arm in &split.arms {
                let weight = match set {
                    Some(set) => set.get(&arm.cluster.name).copied().unwrap_or(0),
                    None => arm.configured,
                };
                arm.weight.store(weight, Ordering::Relaxed);
            }
        }
        stale
    }

    fn split(&self, name: &str) -> Option<&Split> {
        self.routes.iter().find_map(|r| match &r.target {
            Target::Split(split) if r.named && r.name == name => Some(split),
            _ => None,
        })
    }

    /// The clusters of route `name`'s split, or `None` when it has none.
    pub fn split_clusters(&self, name: &str) -> Option<Vec<String>> {
        let split = self.split(name)?;
        Some(split.arms.iter().map(|a| a.cluster.name.clone()).collect())
    }

    /// Each split route's weights in force now: route name, then (cluster, weight).
    pub fn split_weights(&self) -> Vec<(String, Vec<(String, u32)>)> {
        (self.routes.iter())
            .filter_map(|r| match &r.target {
                Target::Split(split) => Some((r.name.clone(), split.weights())),
                Target::One(_) => None,
            })
            .collect()
    }
}

impl Route {
    fn new(
        i: usize,
        config: &RouteConfig,
        clusters: &Clusters,
        instances: &Arc<AtomicUsize>,
    ) -> Option<Route> {
        // Validation guarantees every cluster a route names exists.
        let target = match (&config.cluster, &config.split) {
            (Some(one), _) => Target::One(Arc::clone(clusters.by_name(&one.value)?)),
            (None, Some(split)) => Target::Split(Split {
                arms: (split.value.iter())
                    .map(|arm| {
                        Some(Arm {
                            cluster: Arc::clone(clusters.by_name(&arm.cluster.value)?),
                            configured: arm.weight.0,
                            weight: AtomicU32::new(arm.weight.0),
                        })
                    })
                    .collect::<Option<Vec<Arm>>>()?,
                hash_on: config.hash_on.as_ref().map(|h| h.header.0.clone()),
            }),
            (None, None) => return None,
        };
        let name = config.name.as_ref().map(|n| n.value.clone());
        let label = name.clone().unwrap_or_else(|| format!("routes[{i}]"));
        let rate_limit =
            (config.rate_limit.as_ref()).map(|l| RateLimiter::new(l, &label, instances));
        Some(Route {
            named: name.is_some(),
            name: label,
            rule: config.match_.as_ref().map(Rule::new).unwrap_or_default(),
            target,
            cluster_header: config.cluster_header.as_ref().map(|h| h.0.clone()),
            rate_limit,
            hedging: (config.hedging.as_ref()).map(|h| Arc::new(Hedging::new(h))),
        })
    }

    /// A single cluster's implicit route (no `routes:` in the config).
    fn catch_all(cluster: Arc<Cluster>) -> Route {
        Route {
            name: "default".into(),
            named: false,
            rule: Rule::default(),
            target: Target::One(cluster),
            cluster_header: None,
            rate_limit: None,
            hedging: None,
        }
    }

    /// The cluster this call goes to: the route's one cluster, or a draw from its split.
    pub fn cluster(&self, headers: &HeaderMap) -> &Arc<Cluster> {
        match &self.target {
            Target::One(cluster) => cluster,
            Target::Split(split) => split.draw(headers),
        }
    }
}

impl Rule {
    fn new(config: &RouteMatch) -> Rule {
        Rule {
            service: config.service.as_ref().map(|s| s.value.0.clone()),
            prefix: config.prefix.as_ref().map(|p| p.value.0.clone()),
            headers: config.headers.iter().filter_map(HeaderRule::new).collect(),
        }
    }

    fn holds(&self, path: &str, headers: &HeaderMap) -> bool {
        let path_holds = match (&self.service, &self.prefix) {
            (Some(service), _) => GrpcPath::parse(path).is_some_and(|p| p.service == service),
            (None, Some(prefix)) => path.starts_with(prefix.as_str()),
            (None, None) => true,
        };
        path_holds && self.headers.iter().all(|h| h.holds(headers))
    }
}

impl HeaderRule {
    fn new(config: &HeaderMatch) -> Option<HeaderRule> {
        let name = config.name.value.0.clone();
        // Validation guarantees exactly one of the three.
        match (&config.exact, &config.prefix, config.present) {
            (Some(exact), _, _) => Some(HeaderRule::Exact(name, exact.clone())),
            (_, Some(prefix), _) => Some(HeaderRule::Prefix(name, prefix.clone())),
            (_, _, Some(present)) => Some(HeaderRule::Present(name, present)),
            _ => None,
        }
    }

    /// A key sent more than once holds when any of its values does.
    fn holds(&self, headers: &HeaderMap) -> bool {
        match self {
            HeaderRule::Exact(name, exact) => headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == exact.as_bytes()),
            HeaderRule::Prefix(name, prefix) => {
                (headers.get_all(name).iter()).any(|v| v.as_bytes().starts_with(prefix.as_bytes()))
            }
            HeaderRule::Present(name, present) => headers.contains_key(name) == *present,
        }
    }
}

impl Split {
    /// Draws a cluster in proportion to the weights in force. A cluster without a usable
    /// backend gets no share; when none has one, the weights alone decide. With `hash_on`,
    /// the point drawn is the FNV-1a (64-bit) hash of the header's value modulo the weights'
    /// sum, walked over the arms in config order: the same value lands on the same cluster
    /// on every instance. Without that header, the draw is at random.
    fn draw(&self, headers: &HeaderMap) -> &Arc<Cluster> {
        let mut weights: SmallVec<[u64; 4]> = (self.arms.iter())
            .map(|a| match a.cluster.has_usable_backend() {
                true => u64::from(a.weight.load(Ordering::Relaxed)),
                false => 0,
            })
            .collect();
        if weights.iter().all(|w| *w == 0) {
            for (w, arm) in weights.iter_mut().zip(&self.arms) {
                *w = u64::from(arm.weight.load(Ordering::Relaxed));
            }
        }
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return &self.arms[0].cluster;
        }
        let value = (self.hash_on.as_ref()).and_then(|name| headers.get(name));
        let mut point = match value {
            Some(value) => fnv1a(value.as_bytes()) % total,
            None => fastrand::u64(..total),
        };
        for (weight, arm) in weights.iter().zip(&self.arms) {
            if point < *weight {
                return &arm.cluster;
            }
            point -= weight;
        }
        &self.arms[self.arms.len() - 1].cluster
    }

    fn weights(&self) -> Vec<(String, u32)> {
        (self.arms.iter())
            .map(|a| (a.cluster.name.clone(), a.weight.load(Ordering::Relaxed)))
            .collect()
    }
}

/// FNV-1a, 64 bits: the documented hash of `hash_on`.
fn fnv1a(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
    }
}
