//! The typed config file, parsed with spans and validated once (every key is in
//! docs/configuration.md).
//!
//! Loading has three steps, each with errors that name the file, the key path, what is wrong,
//! and the exact line and column: `sluice.yaml: clusters[1].balancer: unknown variant
//! `fastest`, expected ... at line 14 column 15`.
//! 1. parsing (serde-saphyr): types, "one of" choices as serde enums, and values that check
//!    themselves ([`values`]);
//! 2. cross-field checks ([`validate`]), with the spans kept by `Spanned` fields;
//! 3. reading the files the config names ([`files`]): a separate step, so parsing does no I/O
//!    and a reload can run this step off the data-plane threads.
//!
//! A key sluice does not know is an error: a key is never accepted and then ignored.

pub mod env;
pub mod files;
pub mod steering;
pub mod traces;
mod validate;
pub mod values;
pub mod web;

use std::cell::RefCell;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};
pub use serde_saphyr::Spanned;

pub use files::{
    read_listener_tls, read_upstream_tls, EtcdTlsFiles, Files, ListenerTlsFiles, PemFile,
    UpstreamTlsFiles,
};
pub use steering::{
    FleetConfig, HashOn, HeaderMatch, OverridesConfig, Rate, RateKey, RateLimitConfig, RouteConfig,
    RouteMatch, SplitArm, SplitWeight,
};
pub use traces::{
    HedgeDelay, HedgingConfig, OtlpConfig, OtlpEndpoint, OtlpProtocol, SamplingConfig,
    TracingConfig,
};
pub use values::{
    parse_duration, AtLeastOne, BackendAddr, DurationValue, EtcdEndpoint, EtcdPrefix,
    ForwardHeader, ListenAddr, MaxAttempts, NonEmpty, PathPrefix, Percent, PositiveDuration, Ratio,
    RequestHeader, ServiceName, ThreadCount, TlsServerName, Tolerance,
};
pub use web::{AllowedOrigin, GrpcWebConfig};

/// A config problem, already formatted for an operator: file, key path, what is wrong, where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: NonEmpty<ListenerConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The etcd cluster that `discovery: { etcd: ... }` clusters watch.
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    pub clusters: NonEmpty<ClusterConfig>,
    /// Absent: with a single cluster, everything routes to it.
    #[serde(default)]
    pub routes: Option<Vec<RouteConfig>>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Worker threads for the data plane (default: one per core).
    #[serde(default)]
    pub threads: Option<ThreadCount>,
    /// Absent: no access log.
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    #[serde(default)]
    pub request_id: RequestIdConfig,
    /// Who a client is, for fair shedding: the peer's IP (default), a request header, or the
    /// verified mTLS identity.
    #[serde(default)]
    pub client_key: ClientKeyConfig,
    /// Runtime overrides shared by a fleet through etcd; absent: local and in memory.
    #[serde(default)]
    pub overrides: Option<OverridesConfig>,
    /// Where this instance registers itself for `sluice ctl status`; absent: it does not.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    /// Spans to an OTLP collector; absent: none, and trace headers pass through unchanged.
    #[serde(default)]
    pub tracing: Option<Spanned<TracingConfig>>,
    /// The Unix socket a graceful upgrade hands the listening sockets over (SIGQUIT to the
    /// old process, `sluice run --upgrade` for the new one).
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
    /// What step 3 read from disk; empty until [`Config::load`] reads it.
    #[serde(skip)]
    pub files: Files,
    /// The `${VAR}` values step 1 expanded, for `sluice check`.
    #[serde(skip)]
    pub expansions: Vec<env::Expansion>,
    /// FNV-1a of the expanded text: which config an instance of a fleet runs.
    #[serde(skip)]
    pub source_hash: u64,
}

fn default_upgrade_sock() -> String {
    "/tmp/sluice_upgrade.sock".to_string()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: Spanned<String>,
    pub address: ListenAddr,
    /// TLS on the client leg; absent: cleartext HTTP/2 (h2c, prior knowledge).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// GOAWAY after this age (±10%); off by default.
    #[serde(default)]
    pub max_connection_age: Option<PositiveDuration>,
    /// After that GOAWAY, streams get this long; absent: as long as they take.
    #[serde(default)]
    pub max_connection_age_grace: Option<PositiveDuration>,
    #[serde(default)]
    pub keepalive: DownstreamKeepalive,
    /// Client connections open at once; further ones are closed as soon as they are
    /// accepted. Absent: no limit.
    #[serde(default)]
    pub max_connections: Option<AtLeastOne>,
    /// Streams (calls) at once per client connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: AtLeastOne,
    /// The largest request header block accepted, in bytes (SETTINGS_MAX_HEADER_LIST_SIZE).
    #[serde(default = "default_max_header_list_size")]
    pub max_header_list_size: AtLeastOne,
    /// Also serve gRPC-Web (HTTP/1.1 and HTTP/2) here, with this CORS policy.
    #[serde(default)]
    pub grpc_web: Option<GrpcWebConfig>,
}

/// `listeners[].max_concurrent_streams` by default (also what `H2Settings` starts from).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 10_000;
/// `listeners[].max_header_list_size` by default, in bytes.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

fn default_max_concurrent_streams() -> AtLeastOne {
    AtLeastOne(DEFAULT_MAX_CONCURRENT_STREAMS)
}

fn default_max_header_list_size() -> AtLeastOne {
    AtLeastOne(DEFAULT_MAX_HEADER_LIST_SIZE)
}

/// `listeners[].keepalive`: grpc-go's server keepalive, with its defaults (and an hour's idle
/// timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamKeepalive {
    /// A client PING sooner than this after its previous one is a strike; more than two
    /// strikes get GOAWAY ENHANCE_YOUR_CALM.
    #[serde(default = "default_min_ping_interval")]
    pub min_ping_interval: PositiveDuration,
    /// PINGs while no stream is open are allowed (otherwise each is a strike).
    #[serde(default)]
    pub permit_without_stream: bool,
    /// GOAWAY after this long without a stream.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: PositiveDuration,
    /// sluice PINGs each client connection this often...
    #[serde(default = "default_ping_interval")]
    pub ping_interval: PositiveDuration,
    /// ...and closes it when the PING is unanswered this long.
    #[serde(default = "default_ping_timeout")]
    pub ping_timeout: PositiveDuration,
}

impl Default for DownstreamKeepalive {
    fn default() -> Self {
        DownstreamKeepalive {
            min_ping_interval: default_min_ping_interval(),
            permit_without_stream: false,
            idle_timeout: default_idle_timeout(),
            ping_interval: default_ping_interval(),
            ping_timeout: default_ping_timeout(),
        }
    }
}

fn default_min_ping_interval() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(300))
}

fn default_idle_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(3600))
}

fn default_ping_interval() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(2 * 3600))
}

fn default_ping_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(20))
}

/// `listeners[].tls`: one certificate (`cert_file` and `key_file`), or several chosen by the
/// client's SNI (`certificates`, the first one the default); `client_ca_file` asks every
/// client for a certificate signed by that CA (mTLS).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    #[serde(default)]
    pub cert_file: Option<Spanned<String>>,
    #[serde(default)]
    pub key_file: Option<Spanned<String>>,
    #[serde(default)]
    pub certificates: Vec<CertificatePair>,
    #[serde(default)]
    pub client_ca_file: Option<Spanned<String>>,
    /// Sends the verified client identity upstream in this header (Envoy's XFCC format).
    #[serde(default)]
    pub forward_client_cert: Option<ForwardClientCert>,
}

/// One certificate chain and its private key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    pub cert_file: Spanned<String>,
    pub key_file: Spanned<String>,
}

/// `forward_client_cert: { header }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardClientCert {
    pub header: ForwardHeader,
}

impl ListenerTls {
    /// The certificates in order (the first is the default): `cert_file`/`key_file`, or
    /// `certificates`. Validation makes sure it is exactly one of the two.
    pub fn pairs(&self) -> Vec<(&Spanned<String>, &Spanned<String>)> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => vec![(cert, key)],
            _ => (self.certificates.iter())
                .map(|p| (&p.cert_file, &p.key_file))
                .collect(),
        }
    }

    /// The file names, for telling whether a new config changes them.
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = (self.pairs().into_iter())
            .flat_map(|(c, k)| [c.value.clone(), k.value.clone()])
            .collect();
        paths.extend(self.client_ca_file.as_ref().map(|f| f.value.clone()));
        paths.extend(
            self.forward_client_cert
                .as_ref()
                .map(|f| f.header.0.to_string()),
        );
        paths
    }
}

/// `access_log: { path, enabled }`: one JSON line per finished call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file to append to; absent means stdout.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// `request_id: { generate }`: whether a call without a trace id gets a new `x-request-id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestIdConfig {
    #[serde(default = "default_true")]
    pub generate: bool,
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        RequestIdConfig { generate: true }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: ListenAddr,
    /// A file holding the bearer token mutating calls must carry. Read at each mutation, so
    /// a new token takes effect without a reload.
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `sluice=debug`; `RUST_LOG` wins when set.
    #[serde(default)]
    pub level: Option<String>,
    /// `plain` (the default) or `json`: one object per line, for log pipelines.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `TIME LEVEL TARGET: message key=value ...`, coloured on a terminal.
    #[default]
    Plain,
    /// `{"timestamp":...,"level":...,"target":...,"message":...,key:value,...}` per line.
    Json,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long SIGTERM waits for in-flight streams before the process exits anyway.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: DurationValue,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_timeout() -> DurationValue {
    DurationValue(std::time::Duration::from_secs(30))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: Spanned<String>,
    pub discovery: Spanned<DiscoveryConfig>,
    #[serde(default)]
    pub balancer: BalancerKind,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: PositiveDuration,
    #[serde(default = "default_max_deadline")]
    pub max_deadline: PositiveDuration,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Calls one backend holds at most.
    #[serde(default = "default_max_streams_per_backend")]
    pub max_concurrent_streams_per_backend: AtLeastOne,
    /// How long a call may wait for a free backend slot (never past its deadline).
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: PositiveDuration,
    /// Calls that may wait at once, per cluster; beyond it, shed at once. 0: no queue.
    #[serde(default = "default_max_queued")]
    pub max_queued: u32,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive ejection of backends that fail call after call; on unless `off`.
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Each backend's concurrency limit, learned from its latency below
    /// `max_concurrent_streams_per_backend`; on unless `off`.
    #[serde(default)]
    pub adaptive_concurrency: AdaptiveConcurrency,
    /// HTTP/2 PINGs on backend connections.
    #[serde(default)]
    pub upstream_keepalive: UpstreamKeepalive,
    /// A backend connection without a stream this long is closed.
    #[serde(default = "default_upstream_idle_timeout")]
    pub upstream_idle_timeout: PositiveDuration,
    /// TLS to the backends; absent: cleartext HTTP/2.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// `clusters[].tls`: TLS to the backends. `ca_file` (absent: the system's roots) checks their
/// certificates, `cert_file`/`key_file` present a client certificate (mTLS to backends), and
/// `server_name` replaces the backend's host as the name checked and sent as SNI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub cert_file: Option<Spanned<String>>,
    #[serde(default)]
    pub key_file: Option<Spanned<String>>,
    #[serde(default)]
    pub server_name: Option<TlsServerName>,
}

/// `health_check: { interval, timeout, service, unhealthy_threshold, healthy_threshold }`:
/// active grpc.health.v1 checks, off unless present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "default_health_interval")]
    pub interval: PositiveDuration,
    #[serde(default = "default_health_timeout")]
    pub timeout: PositiveDuration,
    /// The service name sent in `Check`; "" asks about the server as a whole.
    #[serde(default)]
    pub service: String,
    /// Failed checks in a row that take a backend out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: AtLeastOne,
    /// Passed checks in a row that bring it back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: AtLeastOne,
}

fn default_health_interval() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(5))
}

fn default_health_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(1))
}

fn default_unhealthy_threshold() -> AtLeastOne {
    AtLeastOne(2)
}

fn default_healthy_threshold() -> AtLeastOne {
    AtLeastOne(1)
}

/// `upstream_keepalive: { interval, timeout }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamKeepalive {
    /// A PING goes out on each backend connection this often.
    #[serde(default = "default_keepalive_interval")]
    pub interval: PositiveDuration,
    /// A connection whose PING is unanswered this long is closed.
    #[serde(default = "default_keepalive_timeout")]
    pub timeout: PositiveDuration,
}

impl Default for UpstreamKeepalive {
    fn default() -> Self {
        UpstreamKeepalive {
            interval: default_keepalive_interval(),
            timeout: default_keepalive_timeout(),
        }
    }
}

fn default_keepalive_interval() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(10))
}

fn default_keepalive_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(5))
}

fn default_upstream_idle_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(300))
}

fn default_max_streams_per_backend() -> AtLeastOne {
    AtLeastOne(1000)
}

fn default_queue_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_millis(200))
}

fn default_max_queued() -> u32 {
    1000
}

fn default_connect_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(1))
}

fn default_max_deadline() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(60))
}

/// Where a cluster's backends come from: exactly one of `static` or `etcd`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryConfig {
    /// A fixed list of `HOST:PORT`.
    Static(NonEmpty<Spanned<BackendAddr>>),
    /// Every key under `PREFIX/` is one backend.
    Etcd(EtcdDiscovery),
}

/// `discovery: { etcd: { prefix, format } }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdDiscovery {
    /// Without the trailing slash; sluice watches `PREFIX/`.
    pub prefix: EtcdPrefix,
    #[serde(default)]
    pub format: EtcdFormat,
}

/// How a value under the prefix is decoded (docs/configuration.md, "etcd discovery").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtcdFormat {
    /// Detect per value: JSON with `endpoints` is kratos, JSON with `Addr` is etcd-naming,
    /// anything else is plain.
    #[default]
    Auto,
    EtcdNaming,
    Plain,
    Kratos,
}

/// The top-level `etcd:` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: NonEmpty<Spanned<EtcdEndpoint>>,
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    #[serde(default)]
    pub tls: Option<EtcdTlsConfig>,
    /// Bounds connecting to etcd; lists and watch set-ups get this or 10 s, the longer.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: PositiveDuration,
}

fn default_dial_timeout() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(5))
}

/// TLS to etcd: paths relative to the working directory, read by [`Config::load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    pub ca_file: Spanned<String>,
    #[serde(default)]
    pub cert_file: Option<Spanned<String>>,
    #[serde(default)]
    pub key_file: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    #[default]
    P2cEwma,
    LeastRequest,
    RoundRobin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 1 turns transparent retry off.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: MaxAttempts,
    /// Retries are kept under this share of requests (plus a small floor).
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: Ratio,
    /// Statuses a backend may answer (trailers-only, before any message) that are retried on
    /// another backend; empty by default.
    #[serde(default)]
    pub retry_on: Vec<RetryOn>,
    /// Retry a call whose backend connection died before any byte of its response came back
    /// (docs/configuration.md, "Retries"); on by default.
    #[serde(default = "default_on_lost_connection")]
    pub on_lost_connection: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            budget_ratio: default_budget_ratio(),
            retry_on: Vec::new(),
            on_lost_connection: default_on_lost_connection(),
        }
    }
}

fn default_on_lost_connection() -> bool {
    true
}

/// A status `retry.retry_on` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Unavailable,
    ResourceExhausted,
    Internal,
    Cancelled,
}

fn default_max_attempts() -> MaxAttempts {
    MaxAttempts(2)
}

fn default_budget_ratio() -> Ratio {
    Ratio(0.2)
}

/// `outlier_detection: { consecutive_failures, base_ejection_time, max_ejection_percent }`, or
/// `outlier_detection: off`. On by default, with the defaults below.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutlierDetection {
    Off,
    On(OutlierSettings),
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection::On(OutlierSettings::default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSettings {
    /// Failures in a row that eject a backend.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: AtLeastOne,
    /// How long the first ejection lasts; the n-th lasts n times as long, up to 5 minutes.
    #[serde(default = "default_base_ejection_time")]
    pub base_ejection_time: PositiveDuration,
    /// The largest share of a cluster's backends ejected at once; at least one always stays.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: Percent,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> AtLeastOne {
    AtLeastOne(5)
}

fn default_base_ejection_time() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(10))
}

fn default_max_ejection_percent() -> Percent {
    Percent(50)
}

impl<'de> Deserialize<'de> for OutlierDetection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let expected =
            "`off`, or { consecutive_failures, base_ejection_time, max_ejection_percent }";
        Ok(match off_or(deserializer, expected)? {
            Some(settings) => OutlierDetection::On(settings),
            None => OutlierDetection::Off,
        })
    }
}

/// `adaptive_concurrency: { min_limit, initial_limit, tolerance }`, or
/// `adaptive_concurrency: off`. On by default, with the defaults below.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdaptiveConcurrency {
    /// Each backend's limit is `max_concurrent_streams_per_backend`, fixed.
    Off,
    On(AdaptiveSettings),
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency::On(AdaptiveSettings::default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSettings {
    /// The lowest a backend's limit goes (at most `max_concurrent_streams_per_backend`).
    #[serde(default = "default_min_limit")]
    pub min_limit: AtLeastOne,
    /// Where a new backend's limit starts (at most `max_concurrent_streams_per_backend`).
    #[serde(default = "default_initial_limit")]
    pub initial_limit: AtLeastOne,
    /// How many times slower than under light load a backend may answer before its limit
    /// comes down.
    #[serde(default = "default_tolerance")]
    pub tolerance: Tolerance,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        AdaptiveSettings {
            min_limit: default_min_limit(),
            initial_limit: default_initial_limit(),
            tolerance: default_tolerance(),
        }
    }
}

fn default_min_limit() -> AtLeastOne {
    AtLeastOne(3)
}

fn default_initial_limit() -> AtLeastOne {
    AtLeastOne(20)
}

fn default_tolerance() -> Tolerance {
    Tolerance(2.0)
}

impl<'de> Deserialize<'de> for AdaptiveConcurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let expected = "`off`, or { min_limit, initial_limit, tolerance }";
        Ok(match off_or(deserializer, expected)? {
            Some(settings) => AdaptiveConcurrency::On(settings),
            None => AdaptiveConcurrency::Off,
        })
    }
}

/// A feature that is on with settings, or turned off by the word `off`: `None` for `off`.
/// `expected` lists the settings, for the error on any other word.
fn off_or<'de, D, T>(deserializer: D, expected: &'static str) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    values::checked(deserializer, |written: OffOr<T>| match written {
        OffOr::Settings(settings) => Ok(Some(settings)),
        OffOr::Word(word) if word == "off" => Ok(None),
        OffOr::Word(word) => Err(format!("{word:?}: expected {expected}")),
    })
}

/// What the file says for a feature that `off` turns off: a word (only `off` is one) or the
/// settings.
enum OffOr<T> {
    Word(String),
    Settings(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OffOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OffOrVisitor(std::marker::PhantomData))
    }
}

struct OffOrVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OffOrVisitor<T> {
    type Value = OffOr<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("`off`, or a mapping of settings")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(OffOr::Word(text.to_string()))
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
        let map = serde::de::value::MapAccessDeserializer::new(map);
        Ok(OffOr::Settings(T::deserialize(map)?))
    }
}

/// `client_key`: who a client is, when calls must be shed and the client sending the most is
/// shed first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKeyConfig {
    /// The client connection's IP address.
    #[default]
    PeerIp,
    /// A request header's value (`{ header: x-tenant }`); calls without it share one key.
    Header(RequestHeader),
    /// The verified client certificate's identity under mTLS (its first URI SAN, else its
    /// first DNS SAN, else its subject); the peer IP without one.
    TlsIdentity,
}

// === loading ===

impl Config {
    /// Reads, parses and validates a config file, then reads the files it names. Does blocking
    /// file I/O: call it off the data-plane threads.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{origin}: cannot read: {e}")))?;
        let mut config = Config::parse(&source, &origin)?;
        config.files = Files::read(&config).map_err(|e| e.in_file(&origin))?;
        Ok(config)
    }

    /// Parses and validates config text (no I/O); `origin` names it in errors. The files the
    /// config names are not read: use [`Config::load`] for a config that names any.
    pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
        let lookup = |name: &str| std::env::var(name).ok();
        let (expanded, expansions) =
            env::expand(source, lookup).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let mut config = Config::parse_expanded(&expanded, origin)?;
        config.expansions = expansions;
        let mut hasher = fnv::FnvHasher::default();
        std::hash::Hasher::write(&mut hasher, expanded.as_bytes());
        config.source_hash = std::hash::Hasher::finish(&hasher);
        Ok(config)
    }

    fn parse_expanded(source: &str, origin: &str) -> Result<Config, ConfigError> {
        let options = serde_saphyr::Options {
            with_snippet: false,
            // `true` and `false` only, as YAML 1.2 (and serde_yaml before) has it: no `yes`,
            // `off`.
            strict_booleans: true,
            ..serde_saphyr::Options::default()
        };
        let parsed = serde_saphyr::from_str_with_options::<Tracked>(source, options);
        let config = match parsed {
            Ok(Tracked(config)) => config,
            Err(error) => {
                let path = FAILED_AT
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_default();
                return Err(parse_error(origin, &path, &error, source));
            }
        };
        validate::check(&config).map_err(|e| e.in_file(origin))?;
        Ok(config)
    }
}

thread_local! {
    /// The key path where the last parse on this thread failed (see [`Tracked`]).
    static FAILED_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The config, deserialized through `serde_path_to_error` so a failure's key path is known.
/// The path travels beside the error (in `FAILED_AT`) rather than inside it, so the parser's
/// own error, with its exact location, reaches the operator unchanged.
struct Tracked(Config);

impl<'de> Deserialize<'de> for Tracked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut track = serde_path_to_error::Track::new();
        let tracked = serde_path_to_error::Deserializer::new(deserializer, &mut track);
        match Config::deserialize(tracked) {
            Ok(config) => Ok(Tracked(config)),
            Err(error) => {
                // `Spanned` fields add a `value` step to the path; no config key is named so.
                let path = track.path().to_string().replace(".value[", "[");
                let path: Vec<&str> = path.split('.').filter(|step| *step != "value").collect();
                let path = path.join(".");
                FAILED_AT.with(|p| *p.borrow_mut() = Some(path));
                Err(error)
            }
        }
    }
}

/// `origin: path: message at line L column C`.
fn parse_error(origin: &str, path: &str, error: &serde_saphyr::Error, source: &str) -> ConfigError {
    let location = error.location().map(|at| {
        let place = (at.line() as usize, at.column() as usize);
        unknown_key(error)
            .and_then(|key| key_in_mapping(source, place, key))
            .unwrap_or(place)
    });
    let mut message = error.without_snippet().to_string();
    // The parser's words for a few mistakes, in an operator's.
    const PLAIN_WORDS: [(&str, &str); 3] = [
        (
            "expected end of mapping after enum variant value",
            "choose exactly one of these keys, not several",
        ),
        (
            "unexpected event: expected sequence start",
            "invalid type: expected a list",
        ),
        (
            "unexpected event: expected mapping start",
            "invalid type: expected a mapping of keys",
        ),
    ];
    for (parser, plain) in PLAIN_WORDS {
        if let Some(rest) = message.strip_prefix(parser) {
            message = format!("{plain}{rest}");
        }
    }
    if let Some(at) = error.location() {
        let suffix = format!(" at line {}, column {}", at.line(), at.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    // A value's own check names its place already (see `values::checked`).
    if let (Some((line, column)), false) = (location, message.contains(" at line ")) {
        message = format!("{message} at line {line} column {column}");
    }
    if path.is_empty() || path == "." {
        ConfigError(format!("{origin}: {message}"))
    } else {
        ConfigError(format!("{origin}: {path}: {message}"))
    }
}

/// The key an "unknown field" error is about.
fn unknown_key(error: &serde_saphyr::Error) -> Option<String> {
    let message = error.without_snippet().to_string();
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// Where `key` stands in the mapping that starts at `(line, column)`: the parser reports an
/// unknown key at its mapping's start, and the operator wants the key's own line. Looks at
/// the mapping's lines (block style) or the rest of its first line (flow style).
fn key_in_mapping(
    source: &str,
    (line, column): (usize, usize),
    key: String,
) -> Option<(usize, usize)> {
    let token = format!("{key}:");
    for (index, text) in source.lines().enumerate().skip(line.saturating_sub(1)) {
        let number = index + 1;
        let from = if number == line {
            column.saturating_sub(1)
        } else {
            0
        };
        let indent = text.len() - text.trim_start().len();
        if number > line && !text.trim().is_empty() && indent + 1 < column {
            return None; // left the mapping
        }
        let found = text
            .get(from..)?
            .match_indices(&token)
            .map(|(at, _)| from + at)
            .find(|&at| at == 0 || !text.as_bytes()[at - 1].is_ascii_alphanumeric());
        if let Some(at) = found {
            return Some((number, at + 1));
        }
    }
    None
}

/// A problem found after parsing: the key path, the message, and the span of the value.
#[derive(Debug)]
pub struct Problem {
    pub path: String,
    pub message: String,
    pub at: Option<serde_saphyr::Location>,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
            at: None,
        }
    }

    /// Points the problem at a spanned value.
    pub fn at<T>(mut self, spanned: &Spanned<T>) -> Problem {
        self.at = Some(spanned.referenced);
        self
    }

    pub fn in_file(self, origin: &str) -> ConfigError {
        let at = self
            .at
            .map(|l| format!(" at line {} column {}", l.line(), l.column()))
            .unwrap_or_default();
        ConfigError(format!("{origin}: {}: {}{at}", self.path, self.message))
    }
}

#[cfg(test)]
mod tests;
