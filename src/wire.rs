//! gRPC rules, the bottom layer: status codes with their Go names, who decided a status,
//! `:path` parsing, `grpc-timeout` parsing and encoding, content types, and the trailers-only
//! replies sluice sends for its own errors. Depends on nothing else in the crate.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

// The gRPC header names, built once: looking a header up by `&str` parses and validates the
// name on every call (~150 instructions each, callgrind).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// Attempts made before this one (gRFC A6), on a retried or hedged request.
pub const GRPC_PREVIOUS_RPC_ATTEMPTS: HeaderName =
    HeaderName::from_static("grpc-previous-rpc-attempts");
/// How long a client should wait before retrying (gRFC A6), on RESOURCE_EXHAUSTED answers.
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    pub const COUNT: usize = 17;

    pub const ALL: [Code; Code::COUNT] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// A `grpc-status` value; anything outside 0..=16 is `Unknown`, as gRPC clients read it.
    pub fn from_status(status: u32) -> Code {
        Code::ALL
            .get(status as usize)
            .copied()
            .unwrap_or(Code::Unknown)
    }

    /// The code of a `grpc-status` header, `Unknown` when it is missing or malformed.
    pub fn of_headers(headers: &HeaderMap) -> Code {
        status_of(headers).map_or(Code::Unknown, Code::from_status)
    }

    /// The status a gRPC client reports for an RST_STREAM with `reason` (the "Errors" table
    /// of gRPC's PROTOCOL-HTTP2 document, grpc/grpc on GitHub).
    pub fn of_reset(reason: h2::Reason) -> Code {
        match reason {
            h2::Reason::CANCEL => Code::Cancelled,
            h2::Reason::REFUSED_STREAM => Code::Unavailable,
            h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
            h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
            _ => Code::Internal,
        }
    }

    /// Go's name for the code (`codes.Code.String()`), the `grpc_code` label of
    /// go-grpc-prometheus, so its dashboards and alerts carry over.
    pub fn go_name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "Canceled",
            Code::Unknown => "Unknown",
            Code::InvalidArgument => "InvalidArgument",
            Code::DeadlineExceeded => "DeadlineExceeded",
            Code::NotFound => "NotFound",
            Code::AlreadyExists => "AlreadyExists",
            Code::PermissionDenied => "PermissionDenied",
            Code::ResourceExhausted => "ResourceExhausted",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::Aborted => "Aborted",
            Code::OutOfRange => "OutOfRange",
            Code::Unimplemented => "Unimplemented",
            Code::Internal => "Internal",
            Code::Unavailable => "Unavailable",
            Code::DataLoss => "DataLoss",
            Code::Unauthenticated => "Unauthenticated",
        }
    }

    /// Codes that say the server side failed rather than the request being refused on its
    /// merits: these count as a backend's failures (`/backends`, the status page).
    pub fn is_server_error(self) -> bool {
        matches!(
            self,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        )
    }
}

/// Who decided a call's status: the backend, or sluice itself (the `origin` label and the
/// access log's `origin` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Upstream = 0,
    Proxy = 1,
}

impl Origin {
    pub const ALL: [Origin; 2] = [Origin::Upstream, Origin::Proxy];

    pub fn label(self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Proxy => "proxy",
        }
    }
}

/// A status the proxy answers with itself: always HTTP 200, trailers-only, never a bare 502.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    pub code: Code,
    pub message: String,
    /// Sent as `grpc-retry-pushback-ms`: how long a client with a retry policy should wait.
    pub pushback: Option<Duration>,
}

impl ProxyStatus {
    pub fn new(code: Code, message: impl Into<String>) -> ProxyStatus {
        ProxyStatus {
            code,
            message: message.into(),
            pushback: None,
        }
    }

    /// Shed for overload: RESOURCE_EXHAUSTED, telling retrying clients to wait `pushback`.
    pub fn resource_exhausted(message: impl Into<String>, pushback: Duration) -> ProxyStatus {
        ProxyStatus {
            pushback: Some(pushback),
            ..ProxyStatus::new(Code::ResourceExhausted, message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ProxyStatus {
        ProxyStatus::new(Code::Unavailable, message)
    }

    pub fn deadline_exceeded(message: impl Into<String>) -> ProxyStatus {
        ProxyStatus::new(Code::DeadlineExceeded, message)
    }

    /// The `grpc-status` / `grpc-message` pair, for trailers or a trailers-only HEADERS frame.
    pub fn to_trailers(&self) -> HeaderMap {
        let mut trailers = HeaderMap::with_capacity(2);
        trailers.insert(GRPC_STATUS, HeaderValue::from(self.code as u16));
        // Percent-encoding leaves only visible ASCII, which is always a valid header value.
        let message = utf8_percent_encode(&self.message, GRPC_MESSAGE_ESCAPES).to_string();
        if let Ok(value) = HeaderValue::from_str(&message) {
            trailers.insert(GRPC_MESSAGE, value);
        }
        if let Some(pushback) = self.pushback {
            let millis = pushback.as_millis().min(u128::from(u32::MAX)) as u32;
            trailers.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(millis));
        }
        trailers
    }

    /// A trailers-only response: one HEADERS frame with END_STREAM, status 200.
    pub fn to_response(&self) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.extend(self.to_trailers());
        response
    }
}

/// What gRPC's spec says to percent-encode in `grpc-message`: controls, `%`, and anything
/// outside visible ASCII (the last is done by `utf8_percent_encode` for non-ASCII bytes).
const GRPC_MESSAGE_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// The parts of `:path` = `/package.Service/Method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcPath<'a> {
    pub service: &'a str,
    pub method: &'a str,
}

impl<'a> GrpcPath<'a> {
    /// `None` when the path is not of the `/service/method` shape.
    pub fn parse(path: &'a str) -> Option<GrpcPath<'a>> {
        let rest = path.strip_prefix('/')?;
        let (service, method) = rest.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        Some(GrpcPath { service, method })
    }
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (`H M S m u n`).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: always fits in u64.
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Encodes a remaining budget as `grpc-timeout`, in the finest unit that fits 8 digits.
/// Rounds down, so the backend never believes it has more time than the caller gave.
pub fn encode_timeout(remaining: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = remaining.as_nanos();
    let (amount, unit) = if nanos <= MAX {
        (nanos, 'n')
    } else if nanos / 1_000 <= MAX {
        (nanos / 1_000, 'u')
    } else if nanos / 1_000_000 <= MAX {
        (nanos / 1_000_000, 'm')
    } else if nanos / 1_000_000_000 <= MAX {
        (nanos / 1_000_000_000, 'S')
    } else if nanos / 60_000_000_000 <= MAX {
        (nanos / 60_000_000_000, 'M')
    } else {
        ((nanos / 3_600_000_000_000).min(MAX), 'H')
    };
    // Written by hand: `format!` was ~1k instructions of a ~75k-instruction call.
    let mut text = [0u8; 9];
    let mut at = text.len() - 1;
    text[at] = unit as u8;
    let mut rest = amount as u64; // at most 99,999,999: u64 division is cheaper than u128
    loop {
        at -= 1;
        text[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // At most 8 digits (see above) and one ASCII letter: always a valid header value.
    let mut value = HeaderValue::from_bytes(&text[at..]).expect("digits and a unit are valid");
    // The remaining budget differs on every call: HPACK-indexing it would insert a new entry
    // in the upstream connection's dynamic table per call and evict useful ones. "Sensitive"
    // makes h2 send it as never-indexed.
    value.set_sensitive(true);
    value
}

/// True for `application/grpc` and its `+proto`, `+json`, `;charset` variants.
pub fn is_grpc_content_type(value: Option<&HeaderValue>) -> bool {
    match value.map(HeaderValue::as_bytes) {
        Some(v) => {
            v.starts_with(b"application/grpc")
                && matches!(v.get(16), None | Some(b'+') | Some(b';'))
        }
        None => false,
    }
}

/// The `grpc-status` of a response's trailers (or of a trailers-only response's headers).
pub fn status_of(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|s| s.parse().ok())
}

/// A backend's `grpc-retry-pushback-ms` (gRFC A6): `Some(Some(wait))`; `Some(None)` for a
/// negative or malformed value, which means "do not retry"; `None` when absent.
pub fn retry_pushback(headers: &HeaderMap) -> Option<Option<Duration>> {
    let value = headers.get(GRPC_RETRY_PUSHBACK_MS)?;
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    Some(ms.map(Duration::from_millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_go_names_in_order() {
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i);
            assert_eq!(Code::from_status(i as u32), *code);
        }
        assert_eq!(Code::Cancelled.go_name(), "Canceled");
        assert_eq!(Code::from_status(99), Code::Unknown);
    }

    #[test]
    fn path_parses_service_and_method() {
        let p = GrpcPath::parse("/echo.v1.Echo/Unary").unwrap();
        assert_eq!((p.service, p.method), ("echo.v1.Echo", "Unary"));
        assert!(GrpcPath::parse("/echo.v1.Echo").is_none());
        assert!(GrpcPath::parse("/a/b/c").is_none());
        assert!(GrpcPath::parse("//b").is_none());
    }

    #[test]
    fn timeout_parses_strictly() {
        assert_eq!(parse_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_timeout(b"123456789n"), None, "more than 8 digits");
        assert_eq!(parse_timeout(b"5"), None);
        assert_eq!(parse_timeout(b"S"), None);
        assert_eq!(parse_timeout(b"5s"), None, "lowercase s is not a unit");
        assert_eq!(parse_timeout(b"-5S"), None);
    }

    #[test]
    fn timeout_encodes_within_8_digits_rounding_down() {
        assert_eq!(encode_timeout(Duration::from_nanos(1500)), "1500n");
        assert_eq!(encode_timeout(Duration::ZERO), "0n");
        assert_eq!(
            encode_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(encode_timeout(Duration::from_millis(4999)), "4999000u");
        assert_eq!(encode_timeout(Duration::from_secs(60)), "60000000u");
        assert_eq!(encode_timeout(Duration::from_secs(600)), "600000m");
        assert_eq!(encode_timeout(Duration::from_secs(200_000)), "200000S");
        for d in [1u64, 999, 123_456_789, 99_999_999_999] {
            let encoded = encode_timeout(Duration::from_micros(d));
            assert!(encoded.len() <= 9, "{encoded:?}");
            assert!(parse_timeout(encoded.as_bytes()).unwrap() <= Duration::from_micros(d));
        }
    }

    #[test]
    fn content_type_must_be_grpc() {
        let ok = |s: &'static str| is_grpc_content_type(Some(&HeaderValue::from_static(s)));
        assert!(ok("application/grpc"));
        assert!(ok("application/grpc+proto"));
        assert!(!ok("application/grpc-web"));
        assert!(!ok("application/json"));
        assert!(!is_grpc_content_type(None));
    }

    #[test]
    fn proxy_status_is_trailers_only_with_encoded_message() {
        let response = ProxyStatus::new(Code::Unavailable, "no backend: 100% ✗").to_response();
        assert_eq!(response.status(), 200);
        let h = response.headers();
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "no backend: 100%25 %E2%9C%97");
        assert_eq!(h["content-type"], "application/grpc");
        assert!(h.get("grpc-retry-pushback-ms").is_none());
        let shed = ProxyStatus::resource_exhausted("full", Duration::from_millis(250));
        assert_eq!(
            shed.to_response().headers()["grpc-retry-pushback-ms"],
            "250"
        );
    }
}
