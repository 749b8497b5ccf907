//! `tracing`: OTLP export of a span per call and per attempt, and how calls are sampled; and a
//! route's `hedging`: a second attempt when the first is slow.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{checked, PositiveDuration, Ratio};

/// `tracing: { otlp, sampling, service_name }`. Absent: no spans are made, and `traceparent`
/// and `tracestate` pass through unchanged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    pub otlp: OtlpConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// The `service.name` resource attribute of sluice's spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "sluice".to_string()
}

/// `otlp: { endpoint, protocol, timeout, max_queue }`: where spans go.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// `http://HOST:PORT` (or `https://` for `grpc`): the collector.
    pub endpoint: OtlpEndpoint,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// How long one export may take before its spans are dropped.
    #[serde(default = "default_export_timeout")]
    pub timeout: PositiveDuration,
    /// Finished calls whose spans may wait for export; more are dropped and counted.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

fn default_export_timeout() -> PositiveDuration {
    PositiveDuration(Duration::from_secs(5))
}

fn default_max_queue() -> usize {
    2048
}

/// OTLP over gRPC (`/opentelemetry.proto.collector.trace.v1.TraceService/Export`, port 4317
/// by convention) or over HTTP (protobuf POSTed to `/v1/traces`, port 4318).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    Http,
}

/// The collector's base URL: scheme, host and port, no path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtlpEndpoint(pub String);

impl<'de> Deserialize<'de> for OtlpEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |text: String| OtlpEndpoint::parse(&text))
    }
}

impl OtlpEndpoint {
    fn parse(text: &str) -> Result<OtlpEndpoint, String> {
        let bad = |why: &str| {
            format!("{text:?} is not an OTLP endpoint ({why}); write \"http://127.0.0.1:4317\"")
        };
        let uri: http::Uri = text.parse().map_err(|_| bad("not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad("it needs http:// or https://"));
        }
        if uri.authority().and_then(|a| a.port_u16()).is_none() {
            return Err(bad("it needs a port"));
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("no path: sluice adds /v1/traces for the http protocol"));
        }
        Ok(OtlpEndpoint(text.trim_end_matches('/').to_string()))
    }

    pub fn is_https(&self) -> bool {
        self.0.starts_with("https://")
    }
}

/// `sampling: { ratio }`: parent-based. A call whose `traceparent` says sampled (or not) is
/// traced as its parent says; a call that starts a trace is sampled at `ratio`. A call that
/// ends in error is exported whatever the decision.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    #[serde(default = "default_ratio")]
    pub ratio: Ratio,
}

fn default_ratio() -> Ratio {
    Ratio(0.1)
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            ratio: default_ratio(),
        }
    }
}

/// A route's `hedging: { delay, max_attempts, budget_ratio }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgingConfig {
    /// When a second attempt goes out: `p50`..`p99.9` of the method's observed latency on
    /// the cluster, or a fixed duration.
    #[serde(default = "default_hedge_delay")]
    pub delay: HedgeDelay,
    /// Attempts in all, the first included: 2 to 5.
    #[serde(default = "default_hedge_attempts")]
    pub max_attempts: HedgeAttempts,
    /// Hedges are kept under this share of the route's calls (plus a small floor).
    #[serde(default = "default_hedge_budget")]
    pub budget_ratio: Ratio,
}

fn default_hedge_delay() -> HedgeDelay {
    HedgeDelay::Percentile(95.0)
}

fn default_hedge_attempts() -> HedgeAttempts {
    HedgeAttempts(2)
}

fn default_hedge_budget() -> Ratio {
    Ratio(0.02)
}

/// `hedging.delay`: a percentile of observed latency (`p95`), or a duration (`30ms`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    Percentile(f64),
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |text: String| HedgeDelay::parse(&text))
    }
}

impl HedgeDelay {
    fn parse(text: &str) -> Result<HedgeDelay, String> {
        if let Some(percentile) = text.strip_prefix('p') {
            return match percentile.parse::<f64>() {
                Ok(p) if (50.0..=99.9).contains(&p) => Ok(HedgeDelay::Percentile(p)),
                _ => Err(format!(
                    "{text:?} is not a percentile between p50 and p99.9, such as \"p95\""
                )),
            };
        }
        match super::values::parse_duration(text) {
            Ok(d) if !d.is_zero() => Ok(HedgeDelay::Fixed(d)),
            _ => Err(format!(
                "{text:?} is neither a percentile (\"p95\") nor a duration above 0 (\"30ms\")"
            )),
        }
    }
}

/// `hedging.max_attempts`: 2 to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgeAttempts(pub u32);

impl<'de> Deserialize<'de> for HedgeAttempts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |n: u32| match n {
            2..=5 => Ok(HedgeAttempts(n)),
            n => Err(format!(
                "must be between 2 and 5 (the first attempt included), got {n}"
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_a_scheme_and_a_port_and_no_path() {
        assert!(OtlpEndpoint::parse("http://127.0.0.1:4317").is_ok());
        assert_eq!(
            OtlpEndpoint::parse("https://otel:4317/").unwrap().0,
            "https://otel:4317"
        );
        for bad in [
            "127.0.0.1:4317",
            "http://otel",
            "ftp://otel:1",
            "http://o:1/v1/traces",
        ] {
            assert!(OtlpEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hedge_delays_are_percentiles_or_durations() {
        assert_eq!(HedgeDelay::parse("p95"), Ok(HedgeDelay::Percentile(95.0)));
        assert_eq!(HedgeDelay::parse("p99.9"), Ok(HedgeDelay::Percentile(99.9)));
        assert_eq!(
            HedgeDelay::parse("30ms"),
            Ok(HedgeDelay::Fixed(Duration::from_millis(30)))
        );
        for bad in ["p100", "p10", "0s", "fast"] {
            assert!(HedgeDelay::parse(bad).is_err(), "{bad}");
        }
    }
}
