//! The admin endpoint's mutating calls: drain, undrain and weigh a backend, set a split's
//! weights, and `GET /overrides`. Each mutation is authorised first (a bearer token from
//! `admin.token_file`; without one, only on a loopback admin address) and logged with who
//! made it and what it changed.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use pingora_core::protocols::http::ServerSession;
use serde::Serialize;
use serde_json::Value;
use tracing::{error, info, warn};

use super::{respond, text, Admin};
use crate::overrides::{Change, OverrideSet};
use crate::steering::{Changed, Refused};

/// The largest request body a mutation reads.
const MAX_BODY: usize = 64 * 1024;

/// The header `sluice ctl` names its user in, for the log (`USER@HOST`).
pub const ACTOR_HEADER: &str = "x-sluice-actor";

/// `GET /overrides`.
#[derive(Serialize)]
struct OverridesView<'a> {
    /// A count of local changes, or the etcd revision of the fleet's overrides.
    revision: u64,
    /// Whether the overrides are the fleet's, in etcd.
    fleet: bool,
    overrides: &'a OverrideSet,
    /// Each split route's weights in force now.
    splits_in_force: BTreeMap<String, BTreeMap<String, u32>>,
}

impl Admin {
    /// Answers a mutating call or `GET /overrides`; `None` when `path` is neither.
    pub(super) async fn mutation(
        &self,
        session: &mut ServerSession,
        path: &str,
    ) -> Option<http::Response<Vec<u8>>> {
        let method = session.req_header().method.clone();
        if path == "/overrides" && method == Method::GET {
            return Some(self.overrides_view());
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let is_mutation = matches!(
            parts.as_slice(),
            ["backends", _, _, "drain" | "undrain" | "weight"] | ["routes", _, "split"]
        );
        if !is_mutation {
            return None;
        }
        let expected = if parts[0] == "routes" {
            Method::PUT
        } else {
            Method::POST
        };
        if method != expected {
            let message = format!("{path} takes {expected}\n");
            return Some(text(StatusCode::METHOD_NOT_ALLOWED, &message));
        }
        let by = match self.authorise(session, path) {
            Ok(by) => by,
            Err(refused) => return Some(*refused),
        };
        let body = match read_body(session).await {
            Ok(body) => body,
            Err(message) => return Some(text(StatusCode::BAD_REQUEST, &format!("{message}\n"))),
        };
        let change = match change_of(&parts, &body) {
            Ok(change) => change,
            Err(message) => return Some(text(StatusCode::BAD_REQUEST, &format!("{message}\n"))),
        };
        Some(self.make(change, &by).await)
    }

    async fn make(&self, change: Change, by: &str) -> http::Response<Vec<u8>> {
        match self.steering.change(&change, by).await {
            Ok(Changed::Local(revision)) => text(
                StatusCode::OK,
                &format!("{change}: applied at revision {revision}\n"),
            ),
            Ok(Changed::Fleet(revision)) => {
                info!(%change, by, revision, "override written to the fleet's etcd");
                text(
                    StatusCode::OK,
                    &format!("{change}: written for the fleet at etcd revision {revision}\n"),
                )
            }
            Ok(Changed::Nothing) => text(StatusCode::OK, &format!("{change}: already in force\n")),
            Err(refused) => {
                let status = match refused {
                    Refused::Invalid(_) => StatusCode::BAD_REQUEST,
                    Refused::Unknown(_) => StatusCode::NOT_FOUND,
                    Refused::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                };
                text(status, &format!("{change}: {refused}\n"))
            }
        }
    }

    /// Who may mutate: the holder of the token in `admin.token_file`; without one, anyone
    /// who reaches a loopback admin address. Returns who asked, for the log.
    fn authorise(
        &self,
        session: &ServerSession,
        path: &str,
    ) -> Result<String, Box<http::Response<Vec<u8>>>> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet().copied())
            .map_or("unknown".to_string(), |a: SocketAddr| a.to_string());
        let headers = &session.req_header().headers;
        let actor = headers
            .get(ACTOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("someone");
        let by = format!("{actor} from {peer}");
        let Some(file) = &self.token_file else {
            if self.loopback {
                return Ok(by);
            }
            warn!(%path, %by, "admin: mutation refused: the admin address is not loopback and admin.token_file is not set");
            return Err(Box::new(text(
                StatusCode::FORBIDDEN,
                "mutations on a non-loopback admin address need admin.token_file\n",
            )));
        };
        check_token(file, headers, path, &by).map(|()| by)
    }

    fn overrides_view(&self) -> http::Response<Vec<u8>> {
        let steering = &self.steering;
        let set = steering.overrides.current();
        let router = steering.router.load();
        let view = OverridesView {
            revision: steering.overrides.revision(),
            fleet: steering.store.is_some(),
            overrides: &set,
            splits_in_force: (router.split_weights().into_iter())
                .map(|(route, arms)| (route, arms.into_iter().collect()))
                .collect(),
        };
        let body = serde_json::to_vec_pretty(&view).unwrap_or_default();
        respond(StatusCode::OK, "application/json", body)
    }
}

/// Compares in time independent of where the two differ.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The request carries the bearer token in `file` (read now, so a new token needs no reload).
fn check_token(
    file: &std::path::Path,
    headers: &http::HeaderMap,
    path: &str,
    by: &str,
) -> Result<(), Box<http::Response<Vec<u8>>>> {
    let expected = match std::fs::read_to_string(file) {
        Ok(token) => token.trim().to_string(),
        Err(e) => {
            error!(file = %file.display(), error = %e, "admin: cannot read the token file; mutation refused");
            return Err(Box::new(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the admin token file cannot be read\n",
            )));
        }
    };
    let given = (headers.get(http::header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if !expected.is_empty() && same_token(token, &expected) => Ok(()),
        Some(_) => {
            warn!(%path, %by, "admin: mutation refused: wrong bearer token");
            Err(Box::new(text(
                StatusCode::UNAUTHORIZED,
                "wrong bearer token\n",
            )))
        }
        None => {
            warn!(%path, %by, "admin: mutation refused: no bearer token");
            let mut refused = text(
                StatusCode::UNAUTHORIZED,
                "mutations need `Authorization: Bearer TOKEN` (sluice ctl --token-file)\n",
            );
            refused.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Err(Box::new(refused))
        }
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY {
                    return Err(format!("request body over {MAX_BODY} bytes"));
                }
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(format!("cannot read the request body: {e}")),
        }
    }
}

/// The change a mutating path and its JSON body ask for.
fn change_of(parts: &[&str], body: &[u8]) -> Result<Change, String> {
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let json = || -> Result<Value, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))
    };
    match parts {
        ["backends", cluster, backend, action] => {
            let (cluster, backend) = (decode(cluster), decode(backend));
            Ok(match *action {
                "drain" => Change::Drain { cluster, backend },
                "undrain" => Change::Undrain { cluster, backend },
                _ => Change::Weight {
                    cluster,
                    backend,
                    weight: weight_of(&json()?)?,
                },
            })
        }
        ["routes", route, "split"] => Ok(Change::Split {
            route: decode(route),
            weights: split_of(json()?)?,
        }),
        _ => Err("unknown mutation".into()),
    }
}

/// `{"weight": N}`, or `{"weight": null}` for discovery's weight again.
fn weight_of(body: &Value) -> Result<Option<u32>, String> {
    match body.get("weight") {
        Some(Value::Null) => Ok(None),
        Some(n) => (n.as_u64())
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("weight must be a whole number, not {n}")),
        None => Err(
            "the body must be {\"weight\": N} (or {\"weight\": null} to lift the override)".into(),
        ),
    }
}

/// `{"CLUSTER": WEIGHT, ...}`, or `null` for the config's weights again.
fn split_of(body: Value) -> Result<Option<BTreeMap<String, u32>>, String> {
    match body {
        Value::Null => Ok(None),
        Value::Object(map) => (map.into_iter())
            .map(|(cluster, w)| {
                let weight = (w.as_u64()).and_then(|n| u32::try_from(n).ok());
                weight
                    .map(|w| (cluster.clone(), w))
                    .ok_or_else(|| format!("{cluster}: a weight is a whole number, not {w}"))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some),
        other => Err(format!(
            "the body must be {{\"CLUSTER\": WEIGHT, ...}} or null, not {other}"
        )),
    }
}
