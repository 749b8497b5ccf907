//! `sluice ctl`: the operator's runtime overrides from the command line. Through one
//! instance's admin endpoint (`--admin`), or for the whole fleet straight in etcd (`--etcd`),
//! where every instance watching `overrides.etcd_prefix` applies them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admin::ACTOR_HEADER;
use crate::discovery::etcd::{self as etcd, ClientConfig};
use crate::overrides::{Change, ChangeRecord};
use crate::steering::fleet;
use crate::steering::Changed;
use crate::telemetry::access_log::now_rfc3339;
use crate::BoxError;

/// How long an admin call or an etcd request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where `ctl` acts.
pub enum Target {
    Admin {
        address: String,
        token_file: Option<PathBuf>,
    },
    Etcd {
        endpoints: Vec<String>,
        /// `overrides.etcd_prefix`.
        prefix: String,
        /// `fleet.etcd_prefix`.
        fleet_prefix: String,
    },
}

/// What `ctl` does.
pub enum Action {
    Change(Change),
    Overrides,
    Status,
}

impl Action {
    /// Parses `drain C B`, `undrain C B`, `weight C B N|default`, `split R C=W...|default`,
    /// `overrides` and `status`.
    pub fn parse(words: &[String]) -> Result<Action, String> {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let backend = |c: &str, b: &str| (c.to_string(), b.to_string());
        Ok(match words.as_slice() {
            ["drain", c, b] => {
                let (cluster, backend) = backend(c, b);
                Action::Change(Change::Drain { cluster, backend })
            }
            ["undrain", c, b] => {
                let (cluster, backend) = backend(c, b);
                Action::Change(Change::Undrain { cluster, backend })
            }
            ["weight", c, b, n] => {
                let (cluster, backend) = backend(c, b);
                let weight = match *n {
                    "default" => None,
                    n => Some(n.parse().map_err(|_| format!("weight: {n:?} is not a whole number (or `default`)"))?),
                };
                Action::Change(Change::Weight {
                    cluster,
                    backend,
                    weight,
                })
            }
            ["split", route, "default"] => Action::Change(Change::Split {
                route: route.to_string(),
                weights: None,
            }),
            ["split", route, arms @ ..] if !arms.is_empty() => {
                let mut weights = BTreeMap::new();
                for arm in arms {
                    let (cluster, weight) = arm
                        .split_once('=')
                        .and_then(|(c, w)| Some((c.to_string(), w.parse::<u32>().ok()?)))
                        .ok_or_else(|| format!("split: {arm:?} is not CLUSTER=WEIGHT"))?;
                    weights.insert(cluster, weight);
                }
                Action::Change(Change::Split {
                    route: route.to_string(),
                    weights: Some(weights),
                })
            }
            ["overrides"] => Action::Overrides,
            ["status"] => Action::Status,
            _ => return Err(
                "expected one of: drain CLUSTER BACKEND | undrain CLUSTER BACKEND | weight CLUSTER BACKEND N|default | split ROUTE CLUSTER=W... | split ROUTE default | overrides | status".into(),
            ),
        })
    }
}

/// Runs `ctl`; prints what happened. `Ok(false)`: it ran, and found a problem to report
/// (an instance lagging behind), for exit code 1.
pub fn run(target: Target, action: Action) -> Result<bool, BoxError> {
    if let Action::Change(change) = &action {
        change.check()?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match target {
            Target::Admin {
                address,
                token_file,
            } => by_admin(&address, token_file, action).await,
            Target::Etcd {
                endpoints,
                prefix,
                fleet_prefix,
            } => by_etcd(endpoints, &prefix, &fleet_prefix, action).await,
        }
    })
}

/// `USER@HOST`, for the logs of whoever applies the change.
fn actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", fleet::hostname())
}

async fn by_admin(
    address: &str,
    token_file: Option<PathBuf>,
    action: Action,
) -> Result<bool, BoxError> {
    let token = match &token_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| format!("--token-file {}: {e}", file.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (method, path, body) = match &action {
        Action::Overrides => ("GET", "/overrides".to_string(), String::new()),
        Action::Status => {
            return Err("status lists a fleet's instances from etcd: use --etcd URL --prefix P (and --fleet-prefix)".into())
        }
        Action::Change(change) => request_of(change),
    };
    let (status, answer) = http(address, method, &path, &body, token.as_deref()).await?;
    print!("{answer}");
    if !answer.ends_with('\n') {
        println!();
    }
    if status != 200 {
        return Err(format!("{address}{path}: HTTP {status}").into());
    }
    Ok(true)
}

/// The admin call for a change: method, path, JSON body.
fn request_of(change: &Change) -> (&'static str, String, String) {
    let escape = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    match change {
        Change::Drain { cluster, backend } => (
            "POST",
            format!("/backends/{}/{}/drain", escape(cluster), escape(backend)),
            String::new(),
        ),
        Change::Undrain { cluster, backend } => (
            "POST",
            format!("/backends/{}/{}/undrain", escape(cluster), escape(backend)),
            String::new(),
        ),
        Change::Weight {
            cluster,
            backend,
            weight,
        } => (
            "POST",
            format!("/backends/{}/{}/weight", escape(cluster), escape(backend)),
            serde_json::json!({ "weight": weight }).to_string(),
        ),
        Change::Split { route, weights } => (
            "PUT",
            format!("/routes/{}/split", escape(route)),
            serde_json::to_string(weights).unwrap_or_default(),
        ),
    }
}

/// One HTTP/1.1 request; the status code and the body.
async fn http(
    address: &str,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Result<(u16, String), BoxError> {
    let addr: SocketAddr = crate::probe::probe_address(address)?;
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{ACTOR_HEADER}: {}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            actor(),
            body.len()
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{address}: no answer within {TIMEOUT:?}"))?
        .map_err(|e| format!("{address}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = (head.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{address}: not an HTTP answer"))?;
    Ok((status, body.to_string()))
}

async fn by_etcd(
    endpoints: Vec<String>,
    prefix: &str,
    fleet_prefix: &str,
    action: Action,
) -> Result<bool, BoxError> {
    let config = ClientConfig {
        endpoints,
        credentials: None,
        tls: None,
        dial_timeout: TIMEOUT,
    };
    let mut client = etcd::connect(&config).await?;
    let key = fleet::overrides_key(prefix);
    match action {
        Action::Change(change) => {
            let record = ChangeRecord {
                by: actor(),
                what: change.to_string(),
                at: now_rfc3339(),
            };
            match fleet::write_change(&mut client, &key, &change, record).await? {
                Changed::Fleet(revision) => {
                    println!("{change}: written for the fleet at etcd revision {revision}")
                }
                _ => println!("{change}: already in force"),
            }
            Ok(true)
        }
        Action::Overrides => {
            let (set, revision) = fleet::read(&mut client, &key).await?;
            let shown = serde_json::json!({ "revision": revision, "overrides": set });
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(true)
        }
        Action::Status => status(&mut client, fleet_prefix, prefix).await,
    }
}

/// Lists the fleet's instances; flags those behind the overrides' revision.
async fn status(
    client: &mut etcd_client::Client,
    fleet_prefix: &str,
    prefix: &str,
) -> Result<bool, BoxError> {
    let (instances, revision) = fleet::instances(client, fleet_prefix, Some(prefix)).await?;
    let revision = revision.unwrap_or(0).max(0) as u64;
    println!(
        "overrides revision {revision}; {} instance(s) under {fleet_prefix}/",
        instances.len()
    );
    println!(
        "{:<28} {:<22} {:<17} {:>9}  state",
        "id", "admin", "config", "revision"
    );
    let mut all_current = true;
    for instance in &instances {
        let state = if instance.override_revision >= revision {
            "current"
        } else {
            "LAGGING"
        };
        all_current &= state == "current";
        let admin = instance.admin.as_deref().unwrap_or("-");
        println!(
            "{:<28} {:<22} {:<17} {:>9}  {state}",
            instance.id, admin, instance.config_hash, instance.override_revision
        );
    }
    let hashes: std::collections::HashSet<&str> =
        instances.iter().map(|i| i.config_hash.as_str()).collect();
    if hashes.len() > 1 {
        println!("note: the instances run {} different configs", hashes.len());
    }
    Ok(all_current)
}
