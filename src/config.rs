//! The typed config file (SPEC.md "Config file"), parsed and validated once at load.
//!
//! Every error names the file, the key path and, where the YAML parser knows it, the line:
//! `sluice.yaml: clusters[0].balancer: unknown variant `fastest` ... at line 9 column 15`.
//! Keys that SPEC.md lists but sluice does not build yet are rejected with "not supported yet";
//! a key is never accepted and then ignored.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A config problem, already formatted for an operator: file, key path, what is wrong, line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The etcd cluster that `discovery: { etcd: ... }` clusters watch.
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    pub clusters: Vec<ClusterConfig>,
    /// Absent: with a single cluster, everything routes to it.
    #[serde(default)]
    pub routes: Option<Vec<RouteConfig>>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Worker threads for the data plane (default: one per core).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Absent: no access log.
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    /// The Unix socket a graceful upgrade hands the listening sockets over (SIGQUIT to the
    /// old process, `sluice run --upgrade` for the new one).
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
}

fn default_upgrade_sock() -> String {
    "/tmp/sluice_upgrade.sock".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: ListenAddr,
    #[serde(default)]
    pub tls: Option<NotSupportedYet>,
}

/// `access_log: { path, enabled }`: one JSON line per finished call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file to append to; absent means stdout.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: ListenAddr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `sluice=debug`; `RUST_LOG` wins when set.
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Deserialize)]
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
    DurationValue(Duration::from_secs(30))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub balancer: BalancerKind,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: DurationValue,
    #[serde(default = "default_max_deadline")]
    pub max_deadline: DurationValue,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub max_concurrent_streams_per_backend: Option<NotSupportedYet>,
    #[serde(default)]
    pub queue_timeout: Option<NotSupportedYet>,
    #[serde(default)]
    pub health_check: Option<NotSupportedYet>,
    #[serde(default)]
    pub outlier_detection: Option<NotSupportedYet>,
    #[serde(default)]
    pub tls: Option<NotSupportedYet>,
}

fn default_connect_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(1))
}

fn default_max_deadline() -> DurationValue {
    DurationValue(Duration::from_secs(60))
}

#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `static` in YAML (a Rust keyword, hence the field name).
    #[serde(default, rename = "static")]
    pub static_: Option<Vec<BackendAddr>>,
    #[serde(default)]
    pub etcd: Option<EtcdDiscovery>,
}

/// `discovery: { etcd: { prefix, format } }`: every key under `PREFIX/` is one backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdDiscovery {
    /// Without the trailing slash; sluice watches `PREFIX/`.
    #[serde(deserialize_with = "deserialize_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub format: EtcdFormat,
}

/// How a value under the prefix is decoded (SPEC.md "etcd discovery").
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

fn deserialize_prefix<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    let prefix = text.trim_end_matches('/');
    if prefix.is_empty() || prefix.contains(char::is_whitespace) {
        return Err(de::Error::custom(format!(
            "invalid etcd prefix {text:?}: expected a key prefix such as \"services/echo\""
        )));
    }
    Ok(prefix.to_string())
}

/// The top-level `etcd:` block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<EtcdEndpoint>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<EtcdTlsConfig>,
    /// Bounds connecting to etcd; lists and watch set-ups get this or 10 s, the longer.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: DurationValue,
}

fn default_dial_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}

/// TLS to etcd. Paths are relative to the working directory. The files are read at load, so
/// a missing or unreadable one is a config error, not a watch that never connects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    pub ca_file: PemFile,
    #[serde(default)]
    pub cert_file: Option<PemFile>,
    #[serde(default)]
    pub key_file: Option<PemFile>,
}

/// An etcd client URL: `http://HOST:PORT` or `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint(pub String);

impl EtcdEndpoint {
    pub fn parse(text: &str) -> Result<EtcdEndpoint, String> {
        let bad = || {
            format!(
                "invalid etcd endpoint {text:?}: expected http://HOST:PORT or https://HOST:PORT, such as \"http://127.0.0.1:2379\""
            )
        };
        let rest = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .ok_or_else(bad)?;
        BackendAddr::parse(rest.trim_end_matches('/')).map_err(|_| bad())?;
        Ok(EtcdEndpoint(text.trim_end_matches('/').to_string()))
    }

    pub fn is_https(&self) -> bool {
        self.0.starts_with("https://")
    }
}

impl<'de> Deserialize<'de> for EtcdEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        EtcdEndpoint::parse(&text).map_err(de::Error::custom)
    }
}

/// A PEM file, read and checked while the config loads; holds the path and the contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: String,
    pub pem: Vec<u8>,
}

impl<'de> Deserialize<'de> for PemFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        let pem = std::fs::read(&path)
            .map_err(|e| de::Error::custom(format!("cannot read \"{path}\": {e}")))?;
        if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(de::Error::custom(format!(
                "\"{path}\" is not a PEM file (no \"-----BEGIN\" line)"
            )));
        }
        Ok(PemFile { path, pem })
    }
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
    pub max_attempts: u32,
    /// Retries are kept under this share of requests (plus a small floor, see `RetryBudget`).
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            budget_ratio: default_budget_ratio(),
        }
    }
}

fn default_max_attempts() -> u32 {
    2
}

fn default_budget_ratio() -> f64 {
    0.2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default, rename = "match")]
    pub match_: Option<RouteMatch>,
    pub cluster: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact gRPC service, as in `/echo.v1.Echo/Unary` -> `echo.v1.Echo`.
    #[serde(default)]
    pub service: Option<String>,
    /// A `:path` prefix such as `/echo.v1.`.
    #[serde(default)]
    pub prefix: Option<String>,
}

// === value types that validate while they parse, so their errors carry a line ===

/// A duration written as `250ms`, `5s`, `1m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(DurationValue)
            .map_err(de::Error::custom)
    }
}

/// Parses `250ms`, `5s`, `1m`, `1h` (an integer and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("invalid duration {text:?}: expected an integer and a unit (ms, s, m, h), such as \"250ms\" or \"5s\"")
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// A socket address to listen on: `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "invalid listen address {text:?}: expected IP:PORT, such as \"0.0.0.0:50051\""
            ))
        })
    }
}

/// A backend address: `HOST:PORT`, the host an IP or a name resolved at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr(pub String);

impl BackendAddr {
    pub fn parse(text: &str) -> Result<BackendAddr, String> {
        let bad = || {
            format!(
                "invalid backend address {text:?}: expected HOST:PORT, such as \"10.0.0.7:50051\""
            )
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(BackendAddr(text.to_string())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BackendAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        BackendAddr::parse(&text).map_err(de::Error::custom)
    }
}

/// A SPEC.md key whose feature is not built yet. Present in a file, it is an error, so no one
/// believes a health check or a TLS listener is running when it is not.
#[derive(Debug)]
pub struct NotSupportedYet;

impl<'de> Deserialize<'de> for NotSupportedYet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        de::IgnoredAny::deserialize(deserializer)?;
        Err(de::Error::custom(
            "not supported yet in this version of sluice (see README, \"Config reference\"); remove the key",
        ))
    }
}

// === loading and validation ===

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&source, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors (usually the file path).
    pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
        let deserializer = serde_yaml::Deserializer::from_str(source);
        let config: Config = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| ConfigError(format!("{origin}: {}", describe(e, source))))?;
        config
            .validate(source)
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        Ok(config)
    }

    /// Cross-field checks serde cannot do. Lines are found by searching the source for the
    /// offending value, which is exact for the names and references checked here.
    fn validate(&self, source: &str) -> Result<(), String> {
        let at = |needle: &str| match line_of(source, needle) {
            Some(line) => format!(" at line {line}"),
            None => String::new(),
        };
        if self.listeners.is_empty() {
            return Err("listeners: at least one listener is required".into());
        }
        let mut names = HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.name.is_empty() {
                return Err(format!("listeners[{i}].name: must not be empty"));
            }
            if !names.insert(listener.name.as_str()) {
                return Err(format!(
                    "listeners[{i}].name: duplicate listener name {:?}{}",
                    listener.name,
                    at(&listener.name)
                ));
            }
        }
        if self.clusters.is_empty() {
            return Err("clusters: at least one cluster is required".into());
        }
        let mut names = HashSet::new();
        for (i, cluster) in self.clusters.iter().enumerate() {
            if cluster.name.is_empty() {
                return Err(format!("clusters[{i}].name: must not be empty"));
            }
            if !names.insert(cluster.name.as_str()) {
                return Err(format!(
                    "clusters[{i}].name: duplicate cluster name {:?}{}",
                    cluster.name,
                    at(&cluster.name)
                ));
            }
            match (&cluster.discovery.static_, &cluster.discovery.etcd) {
                (Some(list), None) if list.is_empty() => {
                    return Err(format!(
                        "clusters[{i}].discovery.static: list at least one backend{}",
                        at("static")
                    ))
                }
                (Some(list), None) => {
                    let mut seen = HashSet::new();
                    for (j, backend) in list.iter().enumerate() {
                        if !seen.insert(&backend.0) {
                            return Err(format!(
                                "clusters[{i}].discovery.static[{j}]: {:?} is listed twice{}",
                                backend.0,
                                at(&backend.0)
                            ));
                        }
                    }
                }
                (None, Some(_)) if self.etcd.is_none() => {
                    return Err(format!(
                        "etcd: required, because clusters[{i}] ({:?}) uses etcd discovery; add `etcd: {{ endpoints: [\"http://127.0.0.1:2379\"] }}`",
                        cluster.name
                    ))
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(format!(
                        "clusters[{i}].discovery: exactly one of `static` or `etcd` is required"
                    ))
                }
            }
            if cluster.retry.max_attempts == 0 {
                return Err(format!(
                    "clusters[{i}].retry.max_attempts: must be at least 1 (1 = no retries){}",
                    at("max_attempts")
                ));
            }
            let ratio = cluster.retry.budget_ratio;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(format!(
                    "clusters[{i}].retry.budget_ratio: must be between 0 and 1, got {ratio}{}",
                    at("budget_ratio")
                ));
            }
            if cluster.max_deadline.0.is_zero() {
                return Err(format!(
                    "clusters[{i}].max_deadline: must be greater than 0{}",
                    at("max_deadline")
                ));
            }
            if cluster.connect_timeout.0.is_zero() {
                return Err(format!(
                    "clusters[{i}].connect_timeout: must be greater than 0{}",
                    at("connect_timeout")
                ));
            }
        }
        match &self.routes {
            None if self.clusters.len() > 1 => {
                return Err("routes: required when more than one cluster is configured".to_string())
            }
            None => {}
            Some(routes) => {
                for (i, route) in routes.iter().enumerate() {
                    if !names.contains(route.cluster.as_str()) {
                        return Err(format!(
                            "routes[{i}].cluster: no cluster is named {:?}{}",
                            route.cluster,
                            at(&format!("cluster: {}", route.cluster))
                        ));
                    }
                    if let Some(m) = &route.match_ {
                        match (&m.service, &m.prefix) {
                            (Some(s), None) if !s.is_empty() && !s.contains('/') => {}
                            (None, Some(p)) if p.starts_with('/') => {}
                            (Some(_), None) => {
                                return Err(format!(
                                    "routes[{i}].match.service: a gRPC service name such as \"echo.v1.Echo\", without slashes"
                                ))
                            }
                            (None, Some(_)) => {
                                return Err(format!(
                                    "routes[{i}].match.prefix: must start with '/', such as \"/echo.v1.\""
                                ))
                            }
                            _ => {
                                return Err(format!(
                                    "routes[{i}].match: exactly one of `service` or `prefix` is required"
                                ))
                            }
                        }
                    }
                }
            }
        }
        if let Some(etcd) = &self.etcd {
            validate_etcd(etcd, &at)?;
        }
        if let Some(threads) = self.threads {
            if threads == 0 {
                return Err("threads: must be at least 1".into());
            }
        }
        Ok(())
    }
}

fn validate_etcd(etcd: &EtcdConfig, at: &dyn Fn(&str) -> String) -> Result<(), String> {
    if etcd.endpoints.is_empty() {
        return Err(format!(
            "etcd.endpoints: list at least one endpoint{}",
            at("endpoints")
        ));
    }
    for (i, endpoint) in etcd.endpoints.iter().enumerate() {
        match (endpoint.is_https(), etcd.tls.is_some()) {
            (true, false) => {
                return Err(format!(
                    "etcd.endpoints[{i}]: {:?} is https, so `etcd.tls` (at least `ca_file`) is required{}",
                    endpoint.0,
                    at(&endpoint.0)
                ))
            }
            (false, true) => {
                return Err(format!(
                    "etcd.endpoints[{i}]: {:?} is plain http but `etcd.tls` is set; use https://{}",
                    endpoint.0,
                    at(&endpoint.0)
                ))
            }
            _ => {}
        }
    }
    if etcd.username.is_some() != etcd.password.is_some() {
        return Err(format!(
            "etcd: `username` and `password` go together; set both or neither{}",
            at(if etcd.username.is_some() {
                "username"
            } else {
                "password"
            })
        ));
    }
    if let Some(tls) = &etcd.tls {
        if tls.cert_file.is_some() == tls.key_file.is_some() {
            crate::discovery::etcd_tls_options(tls).map_err(|e| {
                format!(
                    "etcd.tls: the files do not make a usable TLS setup ({}, {}): {e}{}",
                    tls.ca_file.path,
                    tls.cert_file
                        .as_ref()
                        .map_or("no client certificate", |c| c.path.as_str()),
                    at("ca_file")
                )
            })?;
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(format!(
                "etcd.tls: `cert_file` and `key_file` go together (a client certificate and its key){}",
                at(if tls.cert_file.is_some() {
                    "cert_file"
                } else {
                    "key_file"
                })
            ));
        }
    }
    if etcd.dial_timeout.0.is_zero() {
        return Err(format!(
            "etcd.dial_timeout: must be greater than 0{}",
            at("dial_timeout")
        ));
    }
    Ok(())
}

/// Formats a parse error as `path: message at line N`. serde_yaml puts its own (shorter) path
/// in front of the message, and for a bad value or a rejected key it often points at the start
/// of the enclosing mapping. So the full path comes from serde_path_to_error, and the line is
/// the first one, from where serde_yaml pointed, that holds the key (and the quoted bad value).
fn describe(error: serde_path_to_error::Error<serde_yaml::Error>, source: &str) -> String {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let mut message = inner.to_string();
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.contains(' ') && path.starts_with(prefix) {
            message = rest.to_string();
        }
    }
    let reported = inner.location().map(|l| (l.line(), l.column()));
    if let Some((line, column)) = reported {
        if let Some(stripped) = message.strip_suffix(&format!(" at line {line} column {column}")) {
            message = stripped.to_string();
        }
    }
    // The key the error is about: `max_deadline` of `clusters[0].max_deadline`, `static` of
    // `clusters[0].discovery.static[0]`.
    let key = path
        .rsplit('.')
        .next()
        .unwrap_or("")
        .split('[')
        .next()
        .unwrap_or("");
    let value = quoted_value(&message);
    let from = reported.map_or(0, |(line, _)| line.saturating_sub(1));
    let lines: Vec<(usize, &str)> = source.lines().enumerate().skip(from).collect();
    let holds_key = |line: &str| {
        let line = line.trim_start().trim_start_matches("- ");
        !key.is_empty()
            && line
                .strip_prefix(key)
                .is_some_and(|rest| rest.starts_with(':'))
    };
    let holds_value = |line: &str| value.as_deref().is_some_and(|v| line.contains(v));
    let found = lines
        .iter()
        .find(|(_, l)| holds_key(l) && (value.is_none() || holds_value(l)))
        .or_else(|| lines.iter().find(|(_, l)| holds_value(l)))
        .or_else(|| lines.iter().find(|(_, l)| holds_key(l)))
        .map(|(index, _)| index + 1)
        .or(reported.map(|(line, _)| line));
    if let Some(line) = found {
        message = format!("{message} at line {line}");
    }
    if path == "." || path.is_empty() {
        message
    } else {
        format!("{path}: {message}")
    }
}

/// The first `"..."` in a message (our value errors quote the offending value).
fn quoted_value(message: &str) -> Option<String> {
    let start = message.find('"')? + 1;
    let end = start + message[start..].find('"')?;
    (end > start).then(|| message[start..end].to_string())
}

fn line_of(source: &str, needle: &str) -> Option<usize> {
    source
        .lines()
        .position(|line| line.contains(needle))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        Config::parse(yaml, "t.yaml").unwrap_err().to_string()
    }

    const MINIMAL: &str = "
listeners:
  - name: grpc
    address: 127.0.0.1:50051
clusters:
  - name: echo
    discovery:
      static: [\"127.0.0.1:50071\"]
";

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL, "t.yaml").unwrap();
        let cluster = &config.clusters[0];
        assert_eq!(cluster.balancer, BalancerKind::P2cEwma);
        assert_eq!(cluster.max_deadline.0, Duration::from_secs(60));
        assert_eq!(cluster.retry.max_attempts, 2);
        assert_eq!(config.shutdown.drain_timeout.0, Duration::from_secs(30));
    }

    #[test]
    fn durations_parse_strictly() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn unknown_key_names_path_and_line() {
        let e = err(&MINIMAL.replace("    discovery:", "    colour: red\n    discovery:"));
        assert!(e.contains("clusters[0]"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.contains("line 7"), "{e}");
    }

    #[test]
    fn later_features_are_rejected_not_ignored() {
        let e = err(&format!("{MINIMAL}    health_check: {{ interval: 5s }}\n"));
        assert!(e.contains("clusters[0].health_check"), "{e}");
        assert!(e.contains("not supported yet"), "{e}");
    }

    #[test]
    fn route_to_missing_cluster_is_an_error() {
        let e = err(&format!("{MINIMAL}routes:\n  - cluster: nosuch\n"));
        assert!(
            e.contains("routes[0].cluster: no cluster is named \"nosuch\""),
            "{e}"
        );
        assert!(e.contains("line 10"), "{e}");
    }

    const ETCD: &str = "
listeners:
  - name: grpc
    address: 127.0.0.1:50051
etcd:
  endpoints: [\"http://127.0.0.1:2379\"]
clusters:
  - name: echo
    discovery:
      etcd: { prefix: \"services/echo/\", format: etcd-naming }
";

    #[test]
    fn etcd_discovery_parses_with_defaults() {
        let config = Config::parse(ETCD, "t.yaml").unwrap();
        let etcd = config.clusters[0].discovery.etcd.as_ref().unwrap();
        assert_eq!(etcd.prefix, "services/echo");
        assert_eq!(etcd.format, EtcdFormat::EtcdNaming);
        let client = config.etcd.unwrap();
        assert_eq!(client.dial_timeout.0, Duration::from_secs(5));
        let auto = ETCD.replace(", format: etcd-naming", "");
        let config = Config::parse(&auto, "t.yaml").unwrap();
        assert_eq!(
            config.clusters[0].discovery.etcd.as_ref().unwrap().format,
            EtcdFormat::Auto
        );
    }

    #[test]
    fn etcd_config_errors_name_the_key() {
        let cases = [
            (
                ETCD.replace("etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\n", ""),
                "etcd: required, because clusters[0] (\"echo\") uses etcd discovery",
            ),
            (
                ETCD.replace("http://127.0.0.1:2379", "127.0.0.1:2379"),
                "etcd.endpoints[0]: invalid etcd endpoint \"127.0.0.1:2379\"",
            ),
            (
                ETCD.replace("http://", "https://"),
                "etcd.endpoints[0]: \"https://127.0.0.1:2379\" is https, so `etcd.tls`",
            ),
            (
                ETCD.replace("etcd-naming", "consul"),
                "clusters[0].discovery.etcd.format: unknown variant `consul`",
            ),
            (
                ETCD.replace("\"services/echo/\"", "\"/\""),
                "clusters[0].discovery.etcd.prefix: invalid etcd prefix",
            ),
            (
                ETCD.replace("  endpoints:", "  username: root\n  endpoints:"),
                "etcd: `username` and `password` go together",
            ),
            (
                ETCD.replace("  endpoints:", "  dial_timeout: 0s\n  endpoints:"),
                "etcd.dial_timeout: must be greater than 0",
            ),
            (
                ETCD.replace("http://", "https://").replace(
                    "  endpoints:",
                    "  tls: { ca_file: /nonexistent/ca.pem }\n  endpoints:",
                ),
                "etcd.tls.ca_file: cannot read \"/nonexistent/ca.pem\"",
            ),
        ];
        for (yaml, want) in cases {
            let e = err(&yaml);
            assert!(e.contains(want), "want {want:?} in: {e}");
            assert!(
                e.contains("line") || want.starts_with("etcd: required"),
                "{e}"
            );
        }
    }

    #[test]
    fn etcd_tls_files_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("ca.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let yaml = ETCD.replace("http://", "https://").replace(
            "  endpoints:",
            &format!("  tls: {{ ca_file: \"{}\" }}\n  endpoints:", bad.display()),
        );
        let e = err(&yaml);
        assert!(
            e.contains("etcd.tls: the files do not make a usable TLS setup"),
            "{e}"
        );
        assert!(e.contains("not a CA certificate"), "{e}");
    }
}
