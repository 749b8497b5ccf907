//! The live clusters of one config generation, in config order: what `/metrics`,
//! `/backends`, the rate sampler and the certificate watch read, and what a reload builds the
//! next generation from. The proxy's route table (`proxy/route.rs`) points into the same
//! clusters; a reload swaps both.

use std::sync::Arc;

use super::Cluster;
use crate::telemetry::{Export, Scrape};

#[derive(Debug, Default)]
pub struct Clusters {
    list: Vec<Arc<Cluster>>,
}

impl Clusters {
    pub fn new(list: Vec<Arc<Cluster>>) -> Clusters {
        Clusters { list }
    }

    pub fn all(&self) -> &[Arc<Cluster>] {
        &self.list
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.list.iter().find(|c| c.name == name)
    }
}

/// The registry owns the clusters, so it is what hands them to `/metrics`.
impl Export for Clusters {
    fn export(&self, scrape: &mut Scrape) {
        for cluster in &self.list {
            cluster.export(scrape);
        }
    }
}
