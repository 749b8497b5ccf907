//! Value types that check themselves while they parse, so their errors carry the exact line
//! and column of the value at fault.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_saphyr::Spanned;

/// Deserializes a `T` and checks it, naming the value's line and column when the check fails
/// (the parser knows where a value that failed to parse is, but not where one that parsed and
/// then failed a check was).
pub(super) fn checked<'de, D, T, U>(
    deserializer: D,
    check: impl FnOnce(T) -> Result<U, String>,
) -> Result<U, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let spanned = Spanned::<T>::deserialize(deserializer)?;
    let at = spanned.referenced;
    check(spanned.value).map_err(|message| {
        de::Error::custom(format!(
            "{message} at line {} column {}",
            at.line(),
            at.column()
        ))
    })
}

/// Implements `Deserialize` for a type through parsing a string.
macro_rules! parse_from_string {
    ($type:ty, $parse:expr) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                checked(deserializer, |text: String| $parse(&text))
            }
        }
    };
}

/// A duration written as `250ms`, `5s`, `1m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DurationValue(pub Duration);

parse_from_string!(DurationValue, |t: &str| parse_duration(t)
    .map(DurationValue));

/// A duration that must be greater than zero (timeouts, deadlines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PositiveDuration(pub Duration);

parse_from_string!(PositiveDuration, |t: &str| match parse_duration(t)? {
    d if d.is_zero() => Err(format!("must be greater than 0, got {t:?}")),
    d => Ok(PositiveDuration(d)),
});

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

/// The header `forward_client_cert` writes: a valid, lowercase HTTP/2 header name that is
/// not a pseudo-header and not one gRPC or HTTP/2 reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardHeader(pub http::HeaderName);

impl Serialize for ForwardHeader {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

parse_from_string!(ForwardHeader, |t: &str| {
    let reserved = t.starts_with(':')
        || t.starts_with("grpc-")
        || ["te", "connection", "content-type", "user-agent", "host"].contains(&t);
    if t != t.to_ascii_lowercase() || reserved {
        return Err(format!(
            "{t:?} cannot carry the client certificate: use a lowercase header name that is not reserved, such as \"x-forwarded-client-cert\""
        ));
    }
    http::HeaderName::from_bytes(t.as_bytes())
        .map(ForwardHeader)
        .map_err(|_| format!("{t:?} is not a valid header name"))
});

/// A request header that names the client (`client_key: { header }`): a valid, lowercase
/// header name that is not a pseudo-header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader(pub http::HeaderName);

impl Serialize for RequestHeader {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

parse_from_string!(RequestHeader, |t: &str| {
    if t != t.to_ascii_lowercase() || t.starts_with(':') {
        return Err(format!(
            "{t:?}: use a lowercase header name that is not a pseudo-header, such as \"x-tenant\""
        ));
    }
    http::HeaderName::from_bytes(t.as_bytes())
        .map(RequestHeader)
        .map_err(|_| format!("{t:?} is not a valid header name"))
});

/// The name upstream TLS checks a backend's certificate against: a DNS name or an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsServerName(pub String);

parse_from_string!(TlsServerName, |t: &str| {
    rustls::pki_types::ServerName::try_from(t)
        .map(|_| TlsServerName(t.to_string()))
        .map_err(|_| format!("{t:?} is not a DNS name or IP address"))
});

/// A socket address to listen on: `IP:PORT`. Port 0 asks the kernel for a free port; the
/// address actually bound is logged at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ListenAddr(pub SocketAddr);

parse_from_string!(ListenAddr, |t: &str| t.parse().map(ListenAddr).map_err(
    |_| { format!("invalid listen address {t:?}: expected IP:PORT, such as \"0.0.0.0:50051\"") }
));

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

parse_from_string!(BackendAddr, BackendAddr::parse);

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

parse_from_string!(EtcdEndpoint, EtcdEndpoint::parse);

/// An etcd key prefix, kept without its trailing slash (sluice watches `PREFIX/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdPrefix(pub String);

parse_from_string!(EtcdPrefix, |t: &str| {
    let prefix = t.trim_end_matches('/');
    if prefix.is_empty() || prefix.contains(char::is_whitespace) {
        return Err(format!(
            "invalid etcd prefix {t:?}: expected a key prefix such as \"services/echo\""
        ));
    }
    Ok(EtcdPrefix(prefix.to_string()))
});

/// `retry.max_attempts`: attempts in all, the first included; at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAttempts(pub u32);

impl<'de> Deserialize<'de> for MaxAttempts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |n: u32| match n {
            0 => Err("must be at least 1 (1 = no retries)".to_string()),
            n => Ok(MaxAttempts(n)),
        })
    }
}

/// A count of at least 1 (`outlier_detection.consecutive_failures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AtLeastOne(pub u32);

impl<'de> Deserialize<'de> for AtLeastOne {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |n: u32| match n {
            0 => Err("must be at least 1".to_string()),
            n => Ok(AtLeastOne(n)),
        })
    }
}

/// A percentage, 0 to 100 (`outlier_detection.max_ejection_percent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |n: u32| match n {
            0..=100 => Ok(Percent(n)),
            n => Err(format!("must be between 0 and 100, got {n}")),
        })
    }
}

/// A share between 0 and 1 (`retry.budget_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratio(pub f64);

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |r: f64| match r {
            r if (0.0..=1.0).contains(&r) => Ok(Ratio(r)),
            r => Err(format!("must be between 0 and 1, got {r}")),
        })
    }
}

/// `adaptive_concurrency.tolerance`: a factor above 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance(pub f64);

impl<'de> Deserialize<'de> for Tolerance {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |t: f64| match t {
            t if t > 1.0 && t.is_finite() => Ok(Tolerance(t)),
            t => Err(format!(
                "must be a factor greater than 1, such as 2.0, got {t}"
            )),
        })
    }
}

/// `threads`: at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ThreadCount(pub usize);

impl<'de> Deserialize<'de> for ThreadCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |n: usize| match n {
            0 => Err("must be at least 1".to_string()),
            n => Ok(ThreadCount(n)),
        })
    }
}

/// `match.service`: an exact gRPC service name, such as `echo.v1.Echo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName(pub String);

parse_from_string!(ServiceName, |t: &str| if t.is_empty() || t.contains('/') {
    Err(format!(
        "{t:?} is not a gRPC service name such as \"echo.v1.Echo\" (no slashes)"
    ))
} else {
    Ok(ServiceName(t.to_string()))
});

/// `match.prefix`: a `:path` prefix, such as `/echo.v1.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPrefix(pub String);

parse_from_string!(PathPrefix, |t: &str| if t.starts_with('/') {
    Ok(PathPrefix(t.to_string()))
} else {
    Err(format!("{t:?} must start with '/', such as \"/echo.v1.\""))
});

/// A list that must hold at least one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonEmpty<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |items: Vec<T>| match items.is_empty() {
            true => Err("must not be empty: list at least one".to_string()),
            false => Ok(NonEmpty(items)),
        })
    }
}

impl<T> std::ops::Deref for NonEmpty<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_strictly() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
