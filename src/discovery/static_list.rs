//! `discovery: { static: [...] }`: a fixed list, applied once.

use crate::balance::{Cluster, Endpoint};
use crate::config::{BackendAddr, Spanned};

pub(super) fn apply(cluster: &Cluster, list: &[Spanned<BackendAddr>]) {
    let endpoints: Vec<Endpoint> = list
        .iter()
        .map(|address| Endpoint {
            address: address.value.clone(),
            weight: 1,
        })
        .collect();
    super::apply(cluster, &endpoints);
}
