//! The trace id that joins sluice's access log with the backends' logs.
//!
//! A call's id comes from `traceparent` (its trace-id field), `x-request-id`, `x-b3-traceid`
//! or `uber-trace-id` (its first field), the first present and usable. When a call carries
//! none of them, [`ensure`] adds a new `x-request-id` (a UUIDv4) to the request headers, so the
//! id travels upstream whether or not the access log is on.

use http::{HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

/// The longest trace id carried into the log; longer header values are cut.
const MAX_TRACE_ID: usize = 128;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const UBER_TRACE_ID: HeaderName = HeaderName::from_static("uber-trace-id");

/// Adds a generated `x-request-id` when `headers` hold no trace id. A client's own
/// `x-request-id`, even one unfit for the log, is never replaced.
pub fn ensure(headers: &mut HeaderMap) {
    let candidates = Candidates::of(headers);
    if candidates.x_request_id.is_none() && candidates.best().is_none() {
        headers.insert(X_REQUEST_ID, new_request_id());
    }
}

/// The trace id in `headers`, cut to `MAX_TRACE_ID` bytes; `None` when there is none.
pub fn find(headers: &HeaderMap) -> Option<&str> {
    Candidates::of(headers).best()
}

/// The values of the four trace headers, found in one pass over the request's headers: a
/// call carries a handful, and a hash lookup of a custom header name costs about as much as
/// the whole pass (callgrind: ~150 instructions each).
#[derive(Default)]
struct Candidates<'a> {
    traceparent: Option<&'a str>,
    x_request_id: Option<&'a str>,
    x_b3_traceid: Option<&'a str>,
    uber_trace_id: Option<&'a str>,
}

impl<'a> Candidates<'a> {
    fn of(headers: &'a HeaderMap) -> Candidates<'a> {
        let mut found = Candidates::default();
        for (name, value) in headers {
            let slot = match name {
                n if *n == TRACEPARENT => &mut found.traceparent,
                n if *n == X_REQUEST_ID => &mut found.x_request_id,
                n if *n == X_B3_TRACEID => &mut found.x_b3_traceid,
                n if *n == UBER_TRACE_ID => &mut found.uber_trace_id,
                _ => continue,
            };
            // The first value of a repeated header; one that is not text counts as present.
            if slot.is_none() {
                *slot = Some(value.to_str().map(str::trim).unwrap_or_default());
            }
        }
        found
    }

    /// The first usable id, in the order `traceparent`, `x-request-id`, `x-b3-traceid`,
    /// `uber-trace-id`.
    fn best(&self) -> Option<&'a str> {
        // Each candidate must be non-empty visible ASCII, or the next header is tried.
        let usable = |id: &&str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic());
        let found = self
            .traceparent
            .and_then(|v| v.split('-').nth(1))
            .filter(usable)
            .or_else(|| self.x_request_id.filter(usable))
            .or_else(|| self.x_b3_traceid.filter(usable))
            .or_else(|| {
                self.uber_trace_id
                    .and_then(|v| v.split([':', '%']).next())
                    .filter(usable)
            })?;
        // Visible ASCII only, so any byte index is a char boundary.
        Some(&found[..found.len().min(MAX_TRACE_ID)])
    }
}

/// A random UUID (version 4), the shape most services expect in `x-request-id`. The `uuid`
/// crate sets the version and variant bits; `fastrand` (already the balancer's generator)
/// supplies the bytes without a system call per call.
fn new_request_id() -> HeaderValue {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    let id: Uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    // Hex digits and hyphens: always a valid header value.
    let mut value = HeaderValue::from_str(text).expect("a UUID is a valid header value");
    // Unique per call: HPACK-indexing it would only evict useful entries upstream.
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn trace_ids_come_from_each_header_kind() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cases = [
            (
                headers(&[("traceparent", traceparent), ("x-request-id", "r")]),
                "4bf92f3577b34da6a3ce929d0e0e4736",
            ),
            (headers(&[("x-request-id", "req-1")]), "req-1"),
            (
                headers(&[("x-b3-traceid", "80f198ee56343ba8")]),
                "80f198ee56343ba8",
            ),
            (
                headers(&[("uber-trace-id", "5b8aa5a2d2c872e8:5b8aa5a2d2c872e8:0:1")]),
                "5b8aa5a2d2c872e8",
            ),
            (
                headers(&[("uber-trace-id", "5b8aa5a2d2c872e8%3A1%3A0%3A1")]),
                "5b8aa5a2d2c872e8",
            ),
        ];
        for (mut map, want) in cases {
            let before = map.len();
            ensure(&mut map);
            assert_eq!(map.len(), before, "nothing is added when an id is present");
            assert_eq!(find(&map), Some(want));
        }
    }

    #[test]
    fn unusable_ids_fall_through_and_a_client_id_is_kept() {
        let map = headers(&[("traceparent", "00--x-01"), ("x-b3-traceid", "abc")]);
        assert_eq!(find(&map), Some("abc"));
        let mut map = headers(&[("x-request-id", "has space")]);
        ensure(&mut map);
        assert_eq!(map.get("x-request-id").unwrap(), "has space");
        assert_eq!(find(&map), None);
    }

    #[test]
    fn a_missing_trace_id_is_generated_as_a_uuid_v4() {
        let mut map = HeaderMap::new();
        ensure(&mut map);
        let id = find(&map).unwrap().to_string();
        let parsed = Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        let mut other = HeaderMap::new();
        ensure(&mut other);
        assert_ne!(find(&other), Some(id.as_str()));
    }

    #[test]
    fn long_ids_are_cut() {
        let long = "a".repeat(300);
        let mut map = HeaderMap::new();
        map.insert("x-request-id", HeaderValue::from_str(&long).unwrap());
        assert_eq!(find(&map).unwrap().len(), MAX_TRACE_ID);
    }
}
