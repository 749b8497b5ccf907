//! `listeners[].grpc_web`: gRPC-Web for browsers on a listener, and its CORS policy.

use serde::{Deserialize, Serialize};

use super::values::{checked, PositiveDuration, RequestHeader};
use super::Spanned;

/// `grpc_web: { allowed_origins, max_age, allowed_headers, exposed_headers }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcWebConfig {
    /// Origins whose pages may call: exact (`https://app.example.com`), or any subdomain
    /// (`https://*.example.com`). Others get no CORS headers.
    #[serde(default)]
    pub allowed_origins: Vec<Spanned<AllowedOrigin>>,
    /// How long a browser may cache a preflight's answer.
    #[serde(default = "default_max_age")]
    pub max_age: PositiveDuration,
    /// Request headers a page may send beyond gRPC-Web's own.
    #[serde(default)]
    pub allowed_headers: Vec<RequestHeader>,
    /// Response headers and trailers a page may read beyond the gRPC status ones.
    #[serde(default)]
    pub exposed_headers: Vec<RequestHeader>,
}

fn default_max_age() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(600))
}

/// An origin a page may be served from: `scheme://host[:port]`, the host possibly `*.domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedOrigin(pub String);

impl<'de> Deserialize<'de> for AllowedOrigin {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(deserializer, |text: String| AllowedOrigin::parse(&text))
    }
}

impl AllowedOrigin {
    fn parse(text: &str) -> Result<AllowedOrigin, String> {
        let bad = |why: &str| {
            format!("{text:?} is not an origin ({why}); write \"https://app.example.com\" or \"https://*.example.com\"")
        };
        let rest = (text.strip_prefix("https://"))
            .or_else(|| text.strip_prefix("http://"))
            .ok_or_else(|| bad("it needs http:// or https://"))?;
        if rest.is_empty() || rest.contains('/') {
            return Err(bad("no path, not even a trailing slash"));
        }
        let host = rest.strip_prefix("*.").unwrap_or(rest);
        if host.contains('*') || host.is_empty() {
            return Err(bad(
                "a wildcard may only be the first label, as *.example.com",
            ));
        }
        Ok(AllowedOrigin(text.to_ascii_lowercase()))
    }

    /// Whether a request's `Origin` is this one, or a subdomain of a `*.` one.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        match self.0.split_once("://*.") {
            None => origin == self.0,
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|o| o.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(domain))
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_a_subdomain_wildcard() {
        let exact = AllowedOrigin::parse("https://app.example.com").unwrap();
        assert!(exact.allows("https://app.example.com"));
        assert!(exact.allows("HTTPS://App.Example.com"));
        assert!(!exact.allows("http://app.example.com"));
        assert!(!exact.allows("https://app.example.com:8443"));
        let any = AllowedOrigin::parse("https://*.example.com").unwrap();
        assert!(any.allows("https://a.example.com"));
        assert!(any.allows("https://a.b.example.com"));
        assert!(!any.allows("https://example.com"));
        assert!(!any.allows("https://evilexample.com"));
        assert!(!any.allows("http://a.example.com"));
        for bad in [
            "app.example.com",
            "https://a.com/",
            "https://a.*.com",
            "https://",
        ] {
            assert!(AllowedOrigin::parse(bad).is_err(), "{bad}");
        }
    }
}
