//! CORS for gRPC-Web: which pages may call, the preflight sluice answers itself (never
//! forwarded), and the headers every answer to an allowed origin carries, so a page can read
//! a status sluice or a backend sent.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tracing::debug;

use crate::config::{AllowedOrigin, GrpcWebConfig};

/// Request headers gRPC-Web clients send (grpc-web, connect-web), allowed on every listener.
const CLIENT_HEADERS: &[&str] = &[
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "grpc-encoding",
    "authorization",
    "x-request-id",
    "traceparent",
    "tracestate",
];

/// Response headers and trailers a page must be able to read: the status, and when to retry
/// after a shed or rate-limited call.
const STATUS_HEADERS: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-retry-pushback-ms",
];

/// A listener's CORS policy.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<AllowedOrigin>,
    max_age: HeaderValue,
    allow_headers: HeaderValue,
    expose_headers: HeaderValue,
    /// `sluice_grpc_web_origin_refused_total{listener}`.
    refused: prometheus::IntCounter,
}

/// What a request's `Origin` means here.
pub enum Origin {
    /// No `Origin` header: not a cross-origin browser call (curl, a same-origin page).
    None,
    Allowed(HeaderValue),
    /// Not on the list: no CORS headers, so the browser keeps the answer from the page.
    Refused,
}

impl Cors {
    pub fn new(config: &GrpcWebConfig, refused: prometheus::IntCounter) -> Cors {
        let join = |fixed: &[&str], custom: &[crate::config::values::RequestHeader]| {
            let mut names: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
            names.extend(custom.iter().map(|h| h.0.as_str().to_string()));
            HeaderValue::from_str(&names.join(", ")).unwrap_or(HeaderValue::from_static(""))
        };
        Cors {
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.value.clone())
                .collect(),
            max_age: HeaderValue::from(config.max_age.0.as_secs()),
            allow_headers: join(CLIENT_HEADERS, &config.allowed_headers),
            expose_headers: join(STATUS_HEADERS, &config.exposed_headers),
            refused,
        }
    }

    /// Judges a request's `Origin`; counts and logs (debug) one that is refused.
    pub fn origin(&self, headers: &HeaderMap) -> Origin {
        let Some(value) = headers.get(ORIGIN) else {
            return Origin::None;
        };
        let text = value.to_str().unwrap_or_default();
        if self.origins.iter().any(|o| o.allows(text)) {
            return Origin::Allowed(value.clone());
        }
        self.refused.inc();
        debug!(
            origin = text,
            "gRPC-Web: origin not in allowed_origins; no CORS headers"
        );
        Origin::Refused
    }

    /// The answer to a preflight `OPTIONS`: 204 with the policy for an allowed origin, 403
    /// without any CORS header otherwise.
    pub fn preflight(&self, headers: &HeaderMap) -> Response<()> {
        let mut answer = Response::new(());
        match self.origin(headers) {
            Origin::Allowed(origin) => {
                *answer.status_mut() = StatusCode::NO_CONTENT;
                let out = answer.headers_mut();
                self.decorate(&origin, out);
                out.insert(
                    ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("POST, OPTIONS"),
                );
                out.insert(ACCESS_CONTROL_ALLOW_HEADERS, self.allow_headers.clone());
                out.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
            }
            Origin::None | Origin::Refused => *answer.status_mut() = StatusCode::FORBIDDEN,
        }
        answer
    }

    /// The headers of an answer to an allowed origin.
    pub fn decorate(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, self.expose_headers.clone());
        headers.append(VARY, HeaderValue::from_static("Origin"));
    }
}
