//! What must hold for each of sluice's decoders, whatever bytes it is given. Shared by the
//! cargo-fuzz targets (`fuzz/fuzz_targets/`, nightly) and by `tests/fuzz_corpora.rs`, which
//! replays the corpora and tries random inputs on stable in `.ci/run`. Each check panics when
//! a property fails; no decoder may panic on its own.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use sluice::config::{Config, EtcdFormat};
use sluice::discovery::formats::{decode, encode, Decoded};
use sluice::proxy::listener_tls::ClientCert;

/// The config loader, `${VAR}` expansion first: an error names the file it is about.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = Config::parse(text, "fuzz.yaml") {
        let message = error.to_string();
        assert!(message.starts_with("fuzz.yaml"), "{message}");
    }
    // Expansion alone, with a lookup that knows some names and not others.
    let lookup = |name: &str| name.len().is_multiple_of(2).then(|| format!("v-{name}"));
    match sluice::config::env::expand(text, lookup) {
        Ok((expanded, expansions)) => {
            if !text.contains("${") {
                assert_eq!(expanded, text);
            }
            for expansion in &expansions {
                assert!(
                    expansion.line >= 1 && expansion.column >= 1,
                    "{expansion:?}"
                );
                assert!(expansion.written.contains("${"), "{expansion:?}");
            }
        }
        Err(message) => assert!(message.contains("line"), "{message}"),
    }
}

const FORMATS: [EtcdFormat; 4] = [
    EtcdFormat::Auto,
    EtcdFormat::EtcdNaming,
    EtcdFormat::Plain,
    EtcdFormat::Kratos,
];

/// Each etcd value format, and auto-detection: what decodes survives a round trip through
/// what `sluice register` writes, and `auto` agrees with the format it picked.
pub fn etcd_value(data: &[u8]) {
    for format in FORMATS {
        match decode(format, data) {
            Ok(Decoded::Backend(endpoint)) | Ok(Decoded::TlsBackend(endpoint)) => {
                let weight = serde_json::json!({ "weight": endpoint.weight });
                let naming = encode(EtcdFormat::EtcdNaming, &endpoint.address.0, Some(&weight));
                let again = decode(EtcdFormat::EtcdNaming, naming.as_bytes());
                assert_eq!(again, Ok(Decoded::Backend(endpoint.clone())), "{naming}");
                let plain = encode(EtcdFormat::Plain, &endpoint.address.0, None);
                match decode(EtcdFormat::Plain, plain.as_bytes()) {
                    Ok(Decoded::Backend(back)) => assert_eq!(back.address, endpoint.address),
                    other => panic!("{plain:?} decoded as {other:?}"),
                }
            }
            Ok(Decoded::Removed) => {
                assert!(matches!(format, EtcdFormat::Auto | EtcdFormat::EtcdNaming))
            }
            Err(message) => assert!(!message.is_empty()),
        }
    }
    let auto = decode(EtcdFormat::Auto, data);
    if auto.is_ok() {
        let agrees = FORMATS[1..].iter().any(|f| decode(*f, data) == auto);
        assert!(
            agrees,
            "auto decoded {auto:?}, which no explicit format does"
        );
    }
}

/// `grpc-timeout`: what parses encodes again to at most the same time, and that parses.
pub fn grpc_timeout(data: &[u8]) {
    let Some(parsed) = sluice::wire::parse_timeout(data) else {
        return;
    };
    let encoded = sluice::wire::encode_timeout(parsed);
    let again = sluice::wire::parse_timeout(encoded.as_bytes());
    let again = again.unwrap_or_else(|| panic!("{encoded:?} does not parse"));
    assert!(again <= parsed, "{parsed:?} -> {encoded:?} -> {again:?}");
    // Rounded down by less than one unit of the encoding. Nothing is lost below 10^8 ns
    // (nanoseconds fit 8 digits); above, the unit is at most 1000 times one that would have
    // needed more than 8 digits, so under 1/100,000 of the time.
    let lost = parsed - again;
    if parsed.as_nanos() <= 99_999_999 {
        assert_eq!(lost, Duration::ZERO, "{parsed:?}");
    } else {
        assert!(lost <= parsed / 100_000, "{parsed:?} lost {lost:?}");
    }
}

const TRACE_HEADERS: [&str; 5] = [
    "traceparent",
    "x-request-id",
    "x-b3-traceid",
    "uber-trace-id",
    "x-other",
];

/// The trace-id headers: headers made of `data` (a name byte, a length byte, the value). The
/// id found is visible ASCII, at most 128 bytes, and part of one of the headers' values;
/// `ensure` adds an `x-request-id` exactly when there is no id and none was sent.
pub fn trace_ids(data: &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    while let [name, len, tail @ ..] = rest {
        let len = (*len as usize).min(tail.len());
        let (value, after) = tail.split_at(len);
        rest = after;
        let name = HeaderName::from_static(TRACE_HEADERS[*name as usize % TRACE_HEADERS.len()]);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let found = sluice::telemetry::request_id::find(&headers).map(str::to_string);
    if let Some(id) = &found {
        assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
        assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
        let within = headers
            .values()
            .any(|v| v.as_bytes().windows(id.len()).any(|w| w == id.as_bytes()));
        assert!(within, "{id:?} is in no header");
    }
    let sent = headers.contains_key("x-request-id");
    let mut ensured = headers.clone();
    sluice::telemetry::request_id::ensure(&mut ensured);
    let added = ensured.get_all("x-request-id").iter().count()
        > headers.get_all("x-request-id").iter().count();
    assert_eq!(added, found.is_none() && !sent, "{headers:?}");
}

/// XFCC: a client certificate's names, whatever they hold, come back out of the header value
/// as the same fields, in Envoy's grammar; none can add a field of its own.
pub fn xfcc(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{0}');
    let subject = parts.next().unwrap_or_default().to_string();
    let (mut uri, mut dns) = (Vec::new(), Vec::new());
    for (i, part) in parts.enumerate() {
        match i % 2 {
            0 => uri.push(part.to_string()),
            _ => dns.push(part.to_string()),
        }
    }
    let cert = ClientCert {
        subject: subject.clone(),
        dns: dns.clone(),
        uri: uri.clone(),
        hash: "ab12".into(),
    };
    let fields = parse_xfcc_element(&cert.xfcc());
    let mut want = vec![
        ("Hash".to_string(), "ab12".to_string()),
        ("Subject".into(), subject),
    ];
    want.extend(uri.into_iter().map(|u| ("URI".to_string(), u)));
    want.extend(dns.into_iter().map(|d| ("DNS".to_string(), d)));
    assert_eq!(fields, want, "{}", cert.xfcc());
}

/// One XFCC element, as Envoy reads it: `key=value` pairs split on `;`, a value either bare
/// or in double quotes with `\"` and `\\` escapes.
fn parse_xfcc_element(element: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let mut chars = element.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
            let after = chars.next();
            assert!(after.is_none() || after == Some(';'), "{element}");
        } else {
            value = chars.by_ref().take_while(|c| *c != ';').collect();
            assert!(!value.contains([',', '"', '=']), "{element}");
        }
        fields.push((key, value));
    }
    fields
}

thread_local! {
    /// One in-process listener per thread, kept across inputs: a panic in one input's
    /// connection is a failure anyway.
    static LISTENER: sluice::proxy::fuzzing::FuzzListener =
        sluice::proxy::fuzzing::FuzzListener::new();
}

/// The listener, fed raw HTTP/2 frames after the preface: the connection ends once its client
/// has sent them and closed (no hang), and the listener still answers a well-formed call on a
/// new connection (UNAVAILABLE: its one cluster has no backends).
pub fn listener(data: &[u8]) {
    LISTENER.with(|listener| {
        listener.feed(data);
        assert_eq!(listener.call().as_deref(), Some("14"), "after {data:?}");
    });
}

/// gRPC-Web's decoders: a content type never panics; the text mode's base64 decoder takes
/// any bytes in any pieces and answers bytes or an error; and what sluice's own encoder
/// writes, split anywhere, decodes back to the same bytes.
pub fn grpc_web(data: &[u8]) {
    use sluice::proxy::web::frames::{of_content_type, TextDecoder, TextEncoder};
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let _ = of_content_type(Some(&value));
    }
    let cut = usize::from(data.first().copied().unwrap_or(0) % 7) + 1;
    let mut decoder = TextDecoder::default();
    for piece in data.chunks(cut) {
        if decoder.push(piece).is_err() {
            break;
        }
    }
    let _ = decoder.finish();
    let mut encoder = TextEncoder::default();
    let mut text = Vec::new();
    for piece in data.chunks(cut) {
        text.extend_from_slice(&encoder.push(piece));
    }
    text.extend_from_slice(&encoder.finish());
    let mut decoder = TextDecoder::default();
    let mut back = Vec::new();
    for piece in text.chunks(cut + 2) {
        back.extend_from_slice(&decoder.push(piece).expect("sluice's own base64 decodes"));
    }
    decoder
        .finish()
        .expect("sluice's own base64 ends on a whole group");
    assert_eq!(back, data);
}
