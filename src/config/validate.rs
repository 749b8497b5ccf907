//! Step 2 of loading: checks across fields, which serde cannot do while it parses. Each
//! problem points at the span of the value at fault.

use std::collections::HashSet;

use super::{
    AdaptiveConcurrency, Config, DiscoveryConfig, EtcdConfig, ListenerTls, OtlpProtocol, Problem,
    Spanned,
};

pub(super) fn check(config: &Config) -> Result<(), Problem> {
    unique_names("listeners", config.listeners.iter().map(|l| &l.name))?;
    unique_names("clusters", config.clusters.iter().map(|c| &c.name))?;
    for (i, listener) in config.listeners.iter().enumerate() {
        if let Some(tls) = &listener.tls {
            listener_tls(i, tls, &listener.name)?;
        }
        if listener.max_connection_age_grace.is_some() && listener.max_connection_age.is_none() {
            let message = "`max_connection_age_grace` needs `max_connection_age`";
            return Err(Problem::new(format!("listeners[{i}]"), message).at(&listener.name));
        }
    }
    for (i, cluster) in config.clusters.iter().enumerate() {
        if let Some(tls) = &cluster.tls {
            if let (Some(one), None) | (None, Some(one)) = (&tls.cert_file, &tls.key_file) {
                let message =
                    "`cert_file` and `key_file` go together (a client certificate and its key)";
                return Err(Problem::new(format!("clusters[{i}].tls"), message).at(one));
            }
        }
        if let AdaptiveConcurrency::On(adaptive) = &cluster.adaptive_concurrency {
            if adaptive.min_limit.0 > adaptive.initial_limit.0 {
                let message = format!(
                    "`min_limit` ({}) is above `initial_limit` ({}): a limit starts at or above its floor",
                    adaptive.min_limit.0, adaptive.initial_limit.0
                );
                let path = format!("clusters[{i}].adaptive_concurrency");
                return Err(Problem::new(path, message).at(&cluster.name));
            }
        }
        match &cluster.discovery.value {
            DiscoveryConfig::Static(list) => no_duplicates(i, list)?,
            DiscoveryConfig::Etcd(_) if config.etcd.is_none() => {
                return Err(Problem::new(
                    format!("clusters[{i}].discovery"),
                    format!(
                        "cluster {:?} uses etcd discovery, so the top-level `etcd:` block is required; add `etcd: {{ endpoints: [\"http://127.0.0.1:2379\"] }}`",
                        cluster.name.value
                    ),
                )
                .at(&cluster.discovery));
            }
            DiscoveryConfig::Etcd(_) => {}
        }
    }
    routes(config)?;
    tracing_built_in(config)?;
    if let Some(etcd) = &config.etcd {
        check_etcd(etcd)?;
    }
    let needs_etcd = [
        ("overrides", config.overrides.is_some()),
        ("fleet", config.fleet.is_some()),
    ];
    for (key, set) in needs_etcd {
        if set && config.etcd.is_none() {
            let message = format!("`{key}` lives in etcd, so the top-level `etcd:` block is required; add `etcd: {{ endpoints: [\"http://127.0.0.1:2379\"] }}`");
            return Err(Problem::new(key, message));
        }
    }
    Ok(())
}

/// Names must be non-empty and unique within `list` (`listeners` or `clusters`).
fn unique_names<'a>(
    list: &str,
    names: impl Iterator<Item = &'a Spanned<String>>,
) -> Result<(), Problem> {
    let mut seen = HashSet::new();
    for (i, name) in names.enumerate() {
        let path = format!("{list}[{i}].name");
        if name.value.is_empty() {
            return Err(Problem::new(path, "must not be empty").at(name));
        }
        if !seen.insert(name.value.as_str()) {
            let what = list.trim_end_matches('s');
            let message = format!("duplicate {what} name {:?}", name.value);
            return Err(Problem::new(path, message).at(name));
        }
    }
    Ok(())
}

fn no_duplicates(cluster: usize, list: &[Spanned<super::BackendAddr>]) -> Result<(), Problem> {
    let mut seen = HashSet::new();
    for (j, backend) in list.iter().enumerate() {
        if !seen.insert(&backend.value.0) {
            return Err(Problem::new(
                format!("clusters[{cluster}].discovery.static[{j}]"),
                format!("{:?} is listed twice", backend.value.0),
            )
            .at(backend));
        }
    }
    Ok(())
}

fn routes(config: &Config) -> Result<(), Problem> {
    let names: HashSet<&str> = config
        .clusters
        .iter()
        .map(|c| c.name.value.as_str())
        .collect();
    let Some(routes) = &config.routes else {
        if let Some(second) = config.clusters.get(1) {
            return Err(Problem::new(
                "routes",
                "required when more than one cluster is configured (the second cluster starts here)",
            )
            .at(&second.name));
        }
        return Ok(());
    };
    let mut route_names = HashSet::new();
    for (i, route) in routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(name) = &route.name {
            if name.value.is_empty() || name.value.contains(['/', ' ']) {
                let message = "a route name is a non-empty word without '/' or spaces";
                return Err(Problem::new(format!("{path}.name"), message).at(name));
            }
            if !route_names.insert(name.value.as_str()) {
                let message = format!("duplicate route name {:?}", name.value);
                return Err(Problem::new(format!("{path}.name"), message).at(name));
            }
        }
        route_target(&path, route)?;
        for cluster in route.clusters() {
            if !names.contains(cluster.value.as_str()) {
                let at = if route.cluster.is_some() {
                    "cluster"
                } else {
                    "split"
                };
                return Err(Problem::new(
                    format!("{path}.{at}"),
                    format!("no cluster is named {:?}", cluster.value),
                )
                .at(cluster));
            }
        }
        if let Some(rule) = &route.match_ {
            route_match(&path, rule)?;
        }
        if let Some(limit) = &route.rate_limit {
            if limit.fleet_wide && config.fleet.is_none() {
                let message = "`fleet_wide` divides the rate by the live instances, which needs the top-level `fleet: { etcd_prefix }`";
                return Err(Problem::new(format!("{path}.rate_limit"), message).at(&limit.rate));
            }
        }
    }
    Ok(())
}

/// Exactly one of `cluster` and `split`; a split names each cluster once, with some weight;
/// `hash_on` only with a split.
fn route_target(path: &str, route: &super::RouteConfig) -> Result<(), Problem> {
    let split = match (&route.cluster, &route.split) {
        (Some(_), None) => {
            if route.hash_on.is_some() {
                let message = "`hash_on` makes a split sticky; this route has one `cluster`";
                return Err(Problem::new(format!("{path}.hash_on"), message));
            }
            return Ok(());
        }
        (None, Some(split)) => split,
        (Some(cluster), Some(_)) => {
            let message = "give `cluster` or `split`, not both";
            return Err(Problem::new(path.to_string(), message).at(cluster));
        }
        (None, None) => {
            let message = "needs `cluster: NAME` or `split: [{ cluster, weight }, ...]`";
            return Err(Problem::new(path.to_string(), message));
        }
    };
    let mut seen = HashSet::new();
    for (j, arm) in split.value.iter().enumerate() {
        if !seen.insert(arm.cluster.value.as_str()) {
            let message = format!("cluster {:?} is in the split twice", arm.cluster.value);
            return Err(Problem::new(format!("{path}.split[{j}]"), message).at(&arm.cluster));
        }
    }
    if split.value.is_empty() || split.value.iter().all(|arm| arm.weight.0 == 0) {
        let message = "a split needs at least one cluster with a weight above 0";
        return Err(Problem::new(format!("{path}.split"), message).at(split));
    }
    Ok(())
}

/// `service` or `prefix`, not both; each header entry says exactly one thing of its value,
/// and names no binary (`-bin`) key.
fn route_match(path: &str, rule: &super::RouteMatch) -> Result<(), Problem> {
    if let (Some(service), Some(_)) = (&rule.service, &rule.prefix) {
        let message = "choose `service` or `prefix`, not both";
        return Err(Problem::new(format!("{path}.match"), message).at(service));
    }
    for (j, header) in rule.headers.iter().enumerate() {
        let at = format!("{path}.match.headers[{j}]");
        let name = header.name.value.0.as_str();
        if name.ends_with("-bin") {
            let message = format!("{name:?} is binary metadata, which routes cannot match");
            return Err(Problem::new(at, message).at(&header.name));
        }
        let given = [
            header.exact.is_some(),
            header.prefix.is_some(),
            header.present.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            let message = "give exactly one of `exact`, `prefix` or `present`";
            return Err(Problem::new(at, message).at(&header.name));
        }
    }
    Ok(())
}

/// `listeners[i].tls`: one certificate or a list, whole pairs, and an identity to forward only
/// when clients must present one.
fn listener_tls(i: usize, tls: &ListenerTls, name: &Spanned<String>) -> Result<(), Problem> {
    let path = format!("listeners[{i}].tls");
    match (&tls.cert_file, &tls.key_file, tls.certificates.is_empty()) {
        (Some(_), Some(_), true) | (None, None, false) => {}
        (Some(one), _, false) | (_, Some(one), false) => {
            let message = "give `cert_file` and `key_file`, or `certificates`, not both";
            return Err(Problem::new(path, message).at(one));
        }
        (Some(one), None, true) | (None, Some(one), true) => {
            let message =
                "`cert_file` and `key_file` go together (a certificate chain and its key)";
            return Err(Problem::new(path, message).at(one));
        }
        (None, None, true) => {
            let message = "needs a certificate: `cert_file` and `key_file`, or `certificates: [{cert_file, key_file}, ...]`";
            return Err(Problem::new(path, message).at(name));
        }
    }
    if tls.client_ca_file.is_none() && tls.forward_client_cert.is_some() {
        let message = "`forward_client_cert` needs `client_ca_file`: without client certificates there is no identity to forward";
        return Err(Problem::new(format!("{path}.forward_client_cert"), message).at(name));
    }
    Ok(())
}

fn check_etcd(etcd: &EtcdConfig) -> Result<(), Problem> {
    for (i, endpoint) in etcd.endpoints.iter().enumerate() {
        let path = format!("etcd.endpoints[{i}]");
        let url = &endpoint.value.0;
        match (endpoint.value.is_https(), etcd.tls.is_some()) {
            (true, false) => {
                let message =
                    format!("{url:?} is https, so `etcd.tls` (at least `ca_file`) is required");
                return Err(Problem::new(path, message).at(endpoint));
            }
            (false, true) => {
                let message = format!("{url:?} is plain http but `etcd.tls` is set; use https://");
                return Err(Problem::new(path, message).at(endpoint));
            }
            _ => {}
        }
    }
    match (&etcd.username, &etcd.password) {
        (Some(one), None) | (None, Some(one)) => {
            return Err(Problem::new(
                "etcd",
                "`username` and `password` go together; set both or neither",
            )
            .at(one))
        }
        _ => {}
    }
    if let Some(tls) = &etcd.tls {
        match (&tls.cert_file, &tls.key_file) {
            (Some(one), None) | (None, Some(one)) => {
                return Err(Problem::new(
                    "etcd.tls",
                    "`cert_file` and `key_file` go together (a client certificate and its key)",
                )
                .at(one))
            }
            _ => {}
        }
    }
    Ok(())
}

/// `tracing` needs a build with the `otlp` feature (release builds and the image have it).
fn tracing_built_in(config: &Config) -> Result<(), Problem> {
    let Some(tracing) = &config.tracing else {
        return Ok(());
    };
    let otlp = &tracing.value.otlp;
    let problem = if !cfg!(feature = "otlp") {
        "this sluice was built without the `otlp` feature, so it cannot export spans; build it with `--features otlp` (the default) or remove `tracing`"
    } else if otlp.protocol == OtlpProtocol::Http && otlp.endpoint.is_https() {
        "`protocol: http` exports over plain HTTP only; use an http:// endpoint, or `protocol: grpc` for https://"
    } else if otlp.max_queue == 0 {
        "`max_queue` must be at least 1"
    } else {
        return Ok(());
    };
    Err(Problem::new("tracing.otlp", problem).at(tracing))
}
