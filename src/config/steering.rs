//! The config of steering: routes (what they match, one cluster or a weighted split, rate
//! limits), and where a fleet shares its runtime overrides and registers its instances.

use serde::Deserialize;

use super::values::{checked, AtLeastOne, EtcdPrefix, PathPrefix, RequestHeader, ServiceName};
use super::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Names the route for `sluice ctl split` and the rate limit metrics.
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    #[serde(default, rename = "match")]
    pub match_: Option<RouteMatch>,
    /// The one cluster the route sends to, or...
    #[serde(default)]
    pub cluster: Option<Spanned<String>>,
    /// ...clusters drawn per call in proportion to their weights.
    #[serde(default)]
    pub split: Option<Spanned<Vec<SplitArm>>>,
    /// Makes a split's draw sticky: one header value, one cluster.
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    /// Names the chosen cluster in this response header.
    #[serde(default)]
    pub cluster_header: Option<RequestHeader>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// A second attempt on another backend when the first is slow; absent: none.
    #[serde(default)]
    pub hedging: Option<super::HedgingConfig>,
}

impl RouteConfig {
    /// The clusters the route may send to, in config order.
    pub fn clusters(&self) -> Vec<&Spanned<String>> {
        match (&self.cluster, &self.split) {
            (Some(one), _) => vec![one],
            (None, Some(split)) => split.value.iter().map(|arm| &arm.cluster).collect(),
            (None, None) => Vec::new(),
        }
    }
}

/// `match: { service | prefix, headers }`: all that is given must hold; nothing given matches
/// every call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact gRPC service, as in `/echo.v1.Echo/Unary` -> `echo.v1.Echo`.
    #[serde(default)]
    pub service: Option<Spanned<ServiceName>>,
    /// A `:path` prefix such as `/echo.v1.`.
    #[serde(default)]
    pub prefix: Option<Spanned<PathPrefix>>,
    /// Request metadata that must match, every entry.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// `{ name, exact | prefix | present }`: one metadata key and what its value must be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: Spanned<RequestHeader>,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    /// `true`: the key must be there, whatever its value; `false`: it must be absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// One cluster of a split and its share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitArm {
    pub cluster: Spanned<String>,
    pub weight: SplitWeight,
}

/// A split weight: 0 to 10,000 (0 sends nothing, which a canary starts from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitWeight(pub u32);

/// The largest weight of one split arm.
pub const MAX_SPLIT_WEIGHT: u32 = 10_000;

impl<'de> Deserialize<'de> for SplitWeight {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |n: u32| {
            if n > MAX_SPLIT_WEIGHT {
                return Err(format!(
                    "weight {n} is above {MAX_SPLIT_WEIGHT}; weights are relative, so scale them down"
                ));
            }
            Ok(SplitWeight(n))
        })
    }
}

/// `hash_on: { header }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    pub header: RequestHeader,
}

/// `rate_limit: { rate, burst, per, fleet_wide, max_keys }`: token buckets on a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Tokens added per second, written `100/s` or `6000/m`.
    pub rate: Spanned<Rate>,
    /// The bucket's size: calls a quiet key may send at once. Default: one second's rate.
    #[serde(default)]
    pub burst: Option<AtLeastOne>,
    /// One bucket per client key (default), per client key and method, or one for the route.
    #[serde(default)]
    pub per: RateKey,
    /// The rate is the whole fleet's: each instance takes `rate / live instances`.
    #[serde(default)]
    pub fleet_wide: bool,
    /// Keys with a bucket at once; beyond it the least recently used one is evicted.
    #[serde(default = "default_max_keys")]
    pub max_keys: AtLeastOne,
}

/// Keys a route's rate limit holds by default: room for 10,000 clients and more.
pub const DEFAULT_MAX_KEYS: u32 = 100_000;

fn default_max_keys() -> AtLeastOne {
    AtLeastOne(DEFAULT_MAX_KEYS)
}

/// What one bucket is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateKey {
    /// Each client (`client_key`) has its own bucket.
    #[default]
    Client,
    /// Each client has a bucket per gRPC method.
    ClientMethod,
    /// One bucket for every call on the route.
    Route,
}

/// Calls per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |text: String| Rate::parse(&text))
    }
}

impl Rate {
    fn parse(text: &str) -> Result<Rate, String> {
        let bad = || {
            format!("invalid rate {text:?}: expected calls per second or minute, such as \"100/s\" or \"600/m\"")
        };
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: f64 = count.trim().parse().map_err(|_| bad())?;
        let per_second = match unit.trim() {
            "s" => count,
            "m" => count / 60.0,
            _ => return Err(bad()),
        };
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(bad());
        }
        Ok(Rate(per_second))
    }
}

/// `overrides: { etcd_prefix }`: runtime overrides shared by every instance through etcd.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OverridesConfig {
    pub etcd_prefix: EtcdPrefix,
}

/// `fleet: { etcd_prefix, instance_id }`: where each instance registers itself.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub etcd_prefix: EtcdPrefix,
    /// Default: the host name and the admin port (or the process id without an admin
    /// endpoint), so a restarted instance takes its own place again.
    #[serde(default)]
    pub instance_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_or_minute() {
        assert_eq!(Rate::parse("100/s"), Ok(Rate(100.0)));
        assert_eq!(Rate::parse("600/m"), Ok(Rate(10.0)));
        assert_eq!(Rate::parse("0.5/s"), Ok(Rate(0.5)));
        for bad in ["100", "100/h", "0/s", "-1/s", "x/s", "inf/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
