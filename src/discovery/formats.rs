//! The value formats Go services write into etcd, decoded into one backend per key, and
//! encoded again for `sluice register` (docs/configuration.md, "etcd discovery").
//!
//! | format        | value                                                        | writer                                   |
//! |---------------|--------------------------------------------------------------|------------------------------------------|
//! | `etcd-naming` | `{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"weight":3}}`  | go.etcd.io/etcd/client/v3/naming/endpoints |
//! | `plain`       | `10.0.0.7:50051`                                             | go-zero `core/discov`                    |
//! | `kratos`      | `{"endpoints":["grpc://10.0.0.7:9000?isSecure=false"],"metadata":{"weight":"3"}}` | Kratos etcd registry |

use serde_json::Value;

use crate::balance::Endpoint;
use crate::config::{BackendAddr, EtcdFormat};

/// What one etcd value says about its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The key is this backend.
    Backend(Endpoint),
    /// The key is this backend, and it speaks only TLS (Kratos' `isSecure=true`): a cluster
    /// routes to it only with `clusters[].tls`.
    TlsBackend(Endpoint),
    /// The key names no backend: etcd-naming's `"Op": 1` (delete) update.
    Removed,
}

/// Decodes one value. The error says what was wrong, for a log line that also names the key.
pub fn decode(format: EtcdFormat, value: &[u8]) -> Result<Decoded, String> {
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("the value is empty".into());
    }
    match format {
        EtcdFormat::Plain => plain(text),
        EtcdFormat::EtcdNaming => etcd_naming(&json(text)?),
        EtcdFormat::Kratos => kratos(&json(text)?),
        EtcdFormat::Auto if text.starts_with('{') => {
            let value = json(text)?;
            if value.get("endpoints").is_some() {
                kratos(&value)
            } else if value.get("Addr").is_some() {
                etcd_naming(&value)
            } else {
                Err("JSON with neither \"Addr\" (etcd-naming) nor \"endpoints\" (kratos)".into())
            }
        }
        EtcdFormat::Auto => plain(text),
    }
}

fn json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))
}

fn plain(text: &str) -> Result<Decoded, String> {
    Ok(Decoded::Backend(Endpoint {
        address: BackendAddr::parse(text)?,
        weight: 1,
    }))
}

/// `{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}`; `Op` may be absent (endpoints.Manager
/// writes `Addr` and `Metadata` only).
fn etcd_naming(value: &Value) -> Result<Decoded, String> {
    match value.get("Op") {
        None | Some(Value::Null) => {}
        Some(op) => match op.as_u64() {
            Some(0) => {}
            Some(1) => return Ok(Decoded::Removed),
            _ => return Err(format!("\"Op\" is {op}; expected 0 (add) or 1 (delete)")),
        },
    }
    let address = match value.get("Addr") {
        Some(Value::String(addr)) => BackendAddr::parse(addr)?,
        _ => return Err("\"Addr\" is missing or not a string".into()),
    };
    Ok(Decoded::Backend(Endpoint {
        address,
        weight: weight(value.get("Metadata"), "Metadata")?,
    }))
}

/// Kratos' registry value: the first `grpc://` endpoint is the backend; `isSecure=true` makes it
/// a [`Decoded::TlsBackend`], which only a cluster with TLS takes.
fn kratos(value: &Value) -> Result<Decoded, String> {
    let Some(endpoints) = value.get("endpoints").and_then(Value::as_array) else {
        return Err("\"endpoints\" is missing or not a list".into());
    };
    let grpc = endpoints
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix("grpc://"))
        .ok_or("no grpc:// entry in \"endpoints\"")?;
    let (authority, query) = grpc.split_once('?').unwrap_or((grpc, ""));
    let secure = query
        .split('&')
        .any(|pair| pair.eq_ignore_ascii_case("isSecure=true"));
    let endpoint = Endpoint {
        address: BackendAddr::parse(authority.trim_end_matches('/'))?,
        weight: weight(value.get("metadata"), "metadata")?,
    };
    Ok(match secure {
        true => Decoded::TlsBackend(endpoint),
        false => Decoded::Backend(endpoint),
    })
}

/// `weight` inside the metadata object: a positive integer, or a string holding one (Kratos
/// metadata is a map of strings). Absent means 1.
fn weight(metadata: Option<&Value>, field: &str) -> Result<u32, String> {
    let Some(weight) = metadata.and_then(|m| m.get("weight")) else {
        return Ok(1);
    };
    let parsed = match weight {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match parsed {
        Some(w) if w >= 1 => Ok(w.min(u32::MAX as u64) as u32),
        _ => Err(format!(
            "\"{field}.weight\" is {weight}; expected a positive integer"
        )),
    }
}

/// The value `sluice register` writes for `format`: the bare address, or etcd-naming JSON in
/// the field order etcd's endpoints.Manager writes (`{"Op":0,"Addr":...,"Metadata":...}`).
pub fn encode(format: EtcdFormat, address: &str, metadata: Option<&Value>) -> String {
    match format {
        EtcdFormat::Plain => address.to_string(),
        _ => format!(
            r#"{{"Op":0,"Addr":{},"Metadata":{}}}"#,
            Value::from(address),
            metadata.unwrap_or(&Value::Null)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(format: EtcdFormat, value: &str) -> (String, u32) {
        match decode(format, value.as_bytes()) {
            Ok(Decoded::Backend(e)) => (e.address.0, e.weight),
            other => panic!("{value}: {other:?}"),
        }
    }

    #[test]
    fn decodes_what_go_services_write() {
        use EtcdFormat::*;
        let naming = r#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}"#;
        assert_eq!(backend(EtcdNaming, naming), ("10.0.0.7:50051".into(), 1));
        assert_eq!(backend(Auto, naming), ("10.0.0.7:50051".into(), 1));
        let no_op = r#"{"Addr":"10.0.0.7:50051","Metadata":{"weight":3}}"#;
        assert_eq!(backend(Auto, no_op), ("10.0.0.7:50051".into(), 3));
        assert_eq!(
            backend(Plain, "10.0.0.7:50051\n"),
            ("10.0.0.7:50051".into(), 1)
        );
        assert_eq!(
            backend(Auto, "10.0.0.7:50051"),
            ("10.0.0.7:50051".into(), 1)
        );
        let kratos = r#"{"id":"a","name":"echo","version":"","metadata":{"weight":"2"},
            "endpoints":["http://10.0.0.7:8000?isSecure=false","grpc://10.0.0.7:9000?isSecure=false"]}"#;
        assert_eq!(backend(Kratos, kratos), ("10.0.0.7:9000".into(), 2));
        assert_eq!(backend(Auto, kratos), ("10.0.0.7:9000".into(), 2));
    }

    #[test]
    fn op_delete_removes_the_key() {
        let value = br#"{"Op":1,"Addr":"10.0.0.7:50051"}"#;
        assert_eq!(decode(EtcdFormat::Auto, value), Ok(Decoded::Removed));
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        use EtcdFormat::*;
        let err = |format, value: &str| decode(format, value.as_bytes()).unwrap_err();
        assert!(err(Auto, "").contains("empty"));
        assert!(err(Auto, "not an address").contains("invalid backend address"));
        assert!(err(EtcdNaming, "10.0.0.7:1").contains("invalid JSON"));
        assert!(err(Auto, r#"{"Addr":7}"#).contains("\"Addr\""));
        assert!(err(Auto, r#"{"Op":2,"Addr":"a:1"}"#).contains("\"Op\" is 2"));
        assert!(err(Auto, r#"{"Addr":"a:1","Metadata":{"weight":0}}"#).contains("weight"));
        assert!(err(Auto, r#"{"endpoints":["http://a:1"]}"#).contains("no grpc://"));
        let secure = decode(Auto, br#"{"endpoints":["grpc://a:1?isSecure=true"]}"#);
        let endpoint = Endpoint {
            address: BackendAddr("a:1".into()),
            weight: 1,
        };
        assert_eq!(secure, Ok(Decoded::TlsBackend(endpoint)));
        assert!(err(Auto, r#"{"name":"x"}"#).contains("neither"));
        assert!(decode(Auto, &[0xff, 0xfe]).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn register_writes_what_discovery_reads() {
        let metadata = serde_json::json!({"weight": 3});
        let value = encode(EtcdFormat::EtcdNaming, "127.0.0.1:7", Some(&metadata));
        assert_eq!(backend(EtcdFormat::Auto, &value), ("127.0.0.1:7".into(), 3));
        let value = encode(EtcdFormat::Plain, "127.0.0.1:7", None);
        assert_eq!(backend(EtcdFormat::Auto, &value), ("127.0.0.1:7".into(), 1));
    }
}
