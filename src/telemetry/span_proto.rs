//! OTLP's protobuf (`opentelemetry/proto/collector/trace/v1`, stable) for finished calls'
//! spans, written straight from the call's record. Building opentelemetry-proto's message
//! structs and encoding them with prost cost about 30,000 instructions a sampled call
//! (a `String` per attribute key and value, and each nested message measured again at every
//! level above it); writing the fields directly costs a fraction of it. The tests decode
//! what this writes with opentelemetry-proto's own types.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

use super::trace::{AttemptSpan, FinishedCall};
use crate::wire::Code;

/// Field numbers, from the OTLP protos.
mod field {
    pub const REQUEST_RESOURCE_SPANS: u32 = 1;
    pub const RESOURCE_SPANS_RESOURCE: u32 = 1;
    pub const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    pub const SCOPE_SPANS_SCOPE: u32 = 1;
    pub const SCOPE_SPANS_SPANS: u32 = 2;
    pub const SCOPE_NAME: u32 = 1;
    pub const SCOPE_VERSION: u32 = 2;
    pub const SPAN_TRACE_ID: u32 = 1;
    pub const SPAN_SPAN_ID: u32 = 2;
    pub const SPAN_PARENT_SPAN_ID: u32 = 4;
    pub const SPAN_NAME: u32 = 5;
    pub const SPAN_KIND: u32 = 6;
    pub const SPAN_START: u32 = 7;
    pub const SPAN_END: u32 = 8;
    pub const SPAN_ATTRIBUTES: u32 = 9;
    pub const SPAN_STATUS: u32 = 15;
    pub const SPAN_FLAGS: u32 = 16;
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    pub const KEY_VALUE_KEY: u32 = 1;
    pub const KEY_VALUE_VALUE: u32 = 2;
    pub const ANY_STRING: u32 = 1;
    pub const ANY_BOOL: u32 = 2;
    pub const ANY_INT: u32 = 3;
    pub const ANY_DOUBLE: u32 = 4;
}

const SPAN_KIND_SERVER: u64 = 2;
const SPAN_KIND_CLIENT: u64 = 3;
const STATUS_CODE_ERROR: u64 = 2;

/// An attribute's value.
enum Value<'a> {
    Text(&'a str),
    Int(i64),
    Bool(bool),
    Double(f64),
}

/// An `ExportTraceServiceRequest` holding `calls`' spans under one resource (`service.name`).
pub fn export_request(calls: &[FinishedCall], service_name: &str) -> Vec<u8> {
    let mut spans = Vec::with_capacity(calls.len() * 600);
    let mut scratch = Vec::with_capacity(600);
    for call in calls {
        server_span(call, &mut scratch);
        message(field::SCOPE_SPANS_SPANS, &scratch, &mut spans);
        for (number, attempt) in call.trace.attempts.iter().enumerate() {
            attempt_span(call, attempt, number + 1, &mut scratch);
            message(field::SCOPE_SPANS_SPANS, &scratch, &mut spans);
        }
    }
    // The envelope's lengths are known once the spans are: write it, then the spans once.
    let mut scope = Vec::new();
    text(field::SCOPE_NAME, "sluice", &mut scope);
    text(field::SCOPE_VERSION, env!("CARGO_PKG_VERSION"), &mut scope);
    let mut resource = Vec::new();
    let service = [
        ("service.name", Value::Text(service_name)),
        ("service.version", Value::Text(env!("CARGO_PKG_VERSION"))),
    ];
    for (key, value) in service {
        attribute(field::RESOURCE_ATTRIBUTES, key, value, &mut resource);
    }
    let scope_spans_len = field_len(scope.len()) + spans.len();
    let resource_spans_len = field_len(resource.len()) + field_len(scope_spans_len);
    let mut request = Vec::with_capacity(field_len(resource_spans_len));
    key(
        field::REQUEST_RESOURCE_SPANS,
        WireType::LengthDelimited,
        &mut request,
    );
    varint(resource_spans_len as u64, &mut request);
    message(field::RESOURCE_SPANS_RESOURCE, &resource, &mut request);
    key(
        field::RESOURCE_SPANS_SCOPE_SPANS,
        WireType::LengthDelimited,
        &mut request,
    );
    varint(scope_spans_len as u64, &mut request);
    message(field::SCOPE_SPANS_SCOPE, &scope, &mut request);
    request.extend_from_slice(&spans);
    request
}

/// The length of a length-delimited field (tag below 16) whose body is `body` bytes.
fn field_len(body: usize) -> usize {
    1 + encoded_len_varint(body as u64) + body
}

/// The call's server span, into `out` (cleared first).
fn server_span(call: &FinishedCall, out: &mut Vec<u8>) {
    out.clear();
    let trace = &call.trace;
    let name = call.path.trim_start_matches('/');
    span_head(
        call,
        &trace.span_id,
        trace.parent.as_ref(),
        SPAN_KIND_SERVER,
        out,
    );
    fixed64(field::SPAN_START, trace.started_unix_ns, out);
    fixed64(field::SPAN_END, trace.unix_ns(call.ended), out);
    text(field::SPAN_NAME, name, out);
    rpc_attributes(name, out);
    let attributes = [
        ("rpc.grpc.status_code", Value::Int(call.code as i64)),
        ("sluice.origin", Value::Text(call.origin.label())),
        ("sluice.listener", Value::Text(&call.listener)),
        ("sluice.attempts", Value::Int(trace.attempts.len() as i64)),
    ];
    for (key, value) in attributes {
        attribute(field::SPAN_ATTRIBUTES, key, value, out);
    }
    if let Some(cluster) = &call.cluster {
        attribute(
            field::SPAN_ATTRIBUTES,
            "sluice.cluster",
            Value::Text(cluster),
            out,
        );
    }
    if let Some(peer) = call.peer {
        let address = peer.ip().to_string();
        attribute(
            field::SPAN_ATTRIBUTES,
            "client.address",
            Value::Text(&address),
            out,
        );
        let port = Value::Int(i64::from(peer.port()));
        attribute(field::SPAN_ATTRIBUTES, "client.port", port, out);
    }
    if let Some(rejected) = call.rejected {
        attribute(
            field::SPAN_ATTRIBUTES,
            "sluice.rejected",
            Value::Text(rejected),
            out,
        );
    }
    status(call.code, server_error(call.code), out);
}

/// An attempt's client span, child of the server span, into `out` (cleared first).
fn attempt_span(call: &FinishedCall, attempt: &AttemptSpan, number: usize, out: &mut Vec<u8>) {
    out.clear();
    let trace = &call.trace;
    let name = call.path.trim_start_matches('/');
    let code = attempt.code.unwrap_or(Code::Cancelled);
    span_head(
        call,
        &attempt.span_id,
        Some(&trace.span_id),
        SPAN_KIND_CLIENT,
        out,
    );
    fixed64(field::SPAN_START, trace.unix_ns(attempt.started), out);
    let ended = attempt.ended.unwrap_or(call.ended);
    fixed64(field::SPAN_END, trace.unix_ns(ended), out);
    text(field::SPAN_NAME, name, out);
    rpc_attributes(name, out);
    let (host, port) = (attempt.backend.rsplit_once(':')).unwrap_or((&attempt.backend, ""));
    let host = host.trim_matches(['[', ']']);
    attribute(
        field::SPAN_ATTRIBUTES,
        "server.address",
        Value::Text(host),
        out,
    );
    if let Ok(port) = port.parse::<i64>() {
        attribute(field::SPAN_ATTRIBUTES, "server.port", Value::Int(port), out);
    }
    let queue_ms = attempt.queue_wait.as_secs_f64() * 1000.0;
    let attributes = [
        ("rpc.grpc.status_code", Value::Int(code as i64)),
        ("sluice.attempt.kind", Value::Text(attempt.kind.label())),
        ("sluice.attempt.number", Value::Int(number as i64)),
        ("sluice.queue_wait_ms", Value::Double(queue_ms)),
    ];
    for (key, value) in attributes {
        attribute(field::SPAN_ATTRIBUTES, key, value, out);
    }
    if attempt.cancelled_by_hedge {
        attribute(
            field::SPAN_ATTRIBUTES,
            "sluice.hedge.lost",
            Value::Bool(true),
            out,
        );
    }
    status(code, code != Code::Ok && !attempt.cancelled_by_hedge, out);
}

/// The fields every span starts with: ids, flags, kind.
fn span_head(
    call: &FinishedCall,
    span_id: &[u8; 8],
    parent: Option<&[u8; 8]>,
    kind: u64,
    out: &mut Vec<u8>,
) {
    let trace = &call.trace;
    bytes(field::SPAN_TRACE_ID, &trace.trace_id, out);
    bytes(field::SPAN_SPAN_ID, span_id, out);
    if let Some(parent) = parent {
        bytes(field::SPAN_PARENT_SPAN_ID, parent, out);
    }
    key(field::SPAN_FLAGS, WireType::ThirtyTwoBit, out);
    out.extend_from_slice(&u32::from(trace.sampled).to_le_bytes());
    key(field::SPAN_KIND, WireType::Varint, out);
    varint(kind, out);
}

/// `rpc.system`, `rpc.service`, `rpc.method` of `package.Service/Method`.
fn rpc_attributes(name: &str, out: &mut Vec<u8>) {
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let attributes = [
        ("rpc.system", Value::Text("grpc")),
        ("rpc.service", Value::Text(service)),
        ("rpc.method", Value::Text(method)),
    ];
    for (key, value) in attributes {
        attribute(field::SPAN_ATTRIBUTES, key, value, out);
    }
}

/// The span's status: ERROR with the code's name, or unset.
fn status(code: Code, error: bool, out: &mut Vec<u8>) {
    if !error {
        return;
    }
    let mut status = Vec::with_capacity(32);
    text(field::STATUS_MESSAGE, code.go_name(), &mut status);
    key(field::STATUS_CODE, WireType::Varint, &mut status);
    varint(STATUS_CODE_ERROR, &mut status);
    message(field::SPAN_STATUS, &status, out);
}

/// The codes OpenTelemetry's RPC conventions call a server span's error: the server-side
/// failures, and UNIMPLEMENTED.
fn server_error(code: Code) -> bool {
    code.is_server_error() || code == Code::Unimplemented
}

/// A `KeyValue` in field `tag`: its length is summed, not measured from a copy.
fn attribute(tag: u32, name: &str, value: Value<'_>, out: &mut Vec<u8>) {
    let value_len = match value {
        Value::Text(text) => 1 + encoded_len_varint(text.len() as u64) + text.len(),
        Value::Int(n) => 1 + encoded_len_varint(n as u64),
        Value::Bool(_) => 2,
        Value::Double(_) => 9,
    };
    let key_value_len = 1
        + encoded_len_varint(name.len() as u64)
        + name.len()
        + 1
        + encoded_len_varint(value_len as u64)
        + value_len;
    key(tag, WireType::LengthDelimited, out);
    varint(key_value_len as u64, out);
    text(field::KEY_VALUE_KEY, name, out);
    key(field::KEY_VALUE_VALUE, WireType::LengthDelimited, out);
    varint(value_len as u64, out);
    match value {
        Value::Text(value) => text(field::ANY_STRING, value, out),
        Value::Int(n) => {
            key(field::ANY_INT, WireType::Varint, out);
            varint(n as u64, out);
        }
        Value::Bool(b) => {
            key(field::ANY_BOOL, WireType::Varint, out);
            varint(u64::from(b), out);
        }
        Value::Double(x) => {
            key(field::ANY_DOUBLE, WireType::SixtyFourBit, out);
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

fn message(tag: u32, body: &[u8], out: &mut Vec<u8>) {
    bytes(tag, body, out);
}

fn bytes(tag: u32, data: &[u8], out: &mut Vec<u8>) {
    key(tag, WireType::LengthDelimited, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn text(tag: u32, data: &str, out: &mut Vec<u8>) {
    bytes(tag, data.as_bytes(), out);
}

fn fixed64(tag: u32, value: u64, out: &mut Vec<u8>) {
    key(tag, WireType::SixtyFourBit, out);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A field's key: one byte for the tags below 16 that most fields have.
fn key(tag: u32, wire_type: WireType, out: &mut Vec<u8>) {
    match tag {
        1..=15 => out.push((tag << 3) as u8 | wire_type as u8),
        _ => encode_key(tag, wire_type, out),
    }
}

/// A varint: one byte below 128, as most lengths and small numbers are.
fn varint(value: u64, out: &mut Vec<u8>) {
    match value {
        0..=127 => out.push(value as u8),
        _ => encode_varint(value, out),
    }
}
