//! `discovery: { etcd: { prefix, format } }`: one watch task per cluster keeps its backend set
//! equal to the keys under `PREFIX/`.
//!
//! The task lists the prefix, then watches from the next revision. Each watch response is
//! applied as one atomic set swap. When etcd goes away the task reconnects with backoff and
//! resumes from the last revision it saw; if etcd compacted that revision meanwhile, it lists
//! again. Until the first list the cluster is not ready (`/readyz` 503); after it, an outage
//! changes nothing: calls keep going to the last known set, `sluice_discovery_connected` is 0
//! and a warning is logged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
    WatchResponse,
};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::formats::{self, Decoded};
use crate::balance::{Cluster, Endpoint};
use crate::config::{BackendAddr, EtcdConfig, EtcdDiscovery, EtcdFormat, EtcdTlsFiles};
use crate::pace::{self, Backoff};

/// HTTP/2 pings on the etcd connection, so a peer that vanished without a FIN (a partition, a
/// powered-off host) is noticed. etcd refuses pings more often than every 5 s by default.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnect backoff: from 100 ms, doubling, up to 5 s, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Lists and watch set-ups may take `dial_timeout`, and at least this long.
const REQUEST_TIMEOUT_MIN: Duration = Duration::from_secs(10);

/// While etcd stays unreachable, a warning every this many failed attempts (about a minute at
/// the longest backoff); the rest go to debug.
const WARN_EVERY: u32 = 12;

/// What connecting to etcd takes: the endpoints, credentials, dial timeout, and the TLS files
/// the config named (already read).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub endpoints: Vec<String>,
    pub credentials: Option<(String, String)>,
    pub tls: Option<EtcdTlsFiles>,
    pub dial_timeout: Duration,
}

impl ClientConfig {
    pub fn new(etcd: &EtcdConfig, tls: Option<&EtcdTlsFiles>) -> ClientConfig {
        let credentials = match (&etcd.username, &etcd.password) {
            (Some(user), Some(password)) => Some((user.value.clone(), password.value.clone())),
            _ => None,
        };
        ClientConfig {
            endpoints: etcd.endpoints.iter().map(|e| e.value.0.clone()).collect(),
            credentials,
            tls: tls.cloned(),
            dial_timeout: etcd.dial_timeout.0,
        }
    }
}

/// Opens an etcd client with the endpoints, credentials, TLS and dial timeout.
pub async fn connect(etcd: &ClientConfig) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(etcd.dial_timeout)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        // A member cut off from its cluster's leader ends the watch instead of going silent,
        // so the task reconnects (possibly to another endpoint) rather than wait forever.
        .with_require_leader(true);
    if let Some((user, password)) = &etcd.credentials {
        options = options
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(tls) = &etcd.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    match timeout(
        etcd.dial_timeout,
        Client::connect(&etcd.endpoints, Some(options)),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(format!("cannot connect: {error}")),
        Err(_) => Err(format!(
            "cannot connect within dial_timeout ({:?})",
            etcd.dial_timeout
        )),
    }
}

/// The TLS settings for etcd, checked the way a connection will use them: the key must suit
/// the certificate. The server calls this at start and on reload, and `sluice check` too, so a
/// broken pair is a config error rather than a watch that never connects. (The config layer
/// has already checked that each file parses.)
pub fn tls_options(tls: &EtcdTlsFiles) -> Result<TlsOptions, String> {
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca.pem));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(&cert.pem, &key.pem));
    }
    tonic::transport::Endpoint::from_static("https://127.0.0.1:2379")
        .tls_config(options.clone())
        .map_err(|error| {
            let mut message = format!(
                "the files do not make a usable TLS setup ({}, {}): {error}",
                tls.ca.path,
                tls.identity
                    .as_ref()
                    .map_or("no client certificate", |(c, _)| c.path.as_str()),
            );
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            message
        })?;
    Ok(options)
}

/// The watch task of one cluster. Runs until aborted (reload or exit).
pub(super) async fn watch(cluster: Arc<Cluster>, etcd: ClientConfig, source: EtcdDiscovery) {
    let mut prefix = PrefixState::new(cluster, &source);
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
    let mut failures: u32 = 0;
    loop {
        let began = std::time::Instant::now();
        let (error, progressed) = prefix.session(&etcd).await;
        let cluster = &prefix.cluster;
        // The watch worked for a while and then ended (etcd closed it, a leader change, a
        // member restart): reconnect at once, and only call it an outage if that fails. A
        // session that fails as soon as it started goes through the backoff, so a watch etcd
        // keeps refusing cannot turn into a tight loop.
        if progressed && began.elapsed() >= Duration::from_secs(1) {
            info!(cluster = %cluster.name, %error, "etcd watch ended; reconnecting");
            backoff.reset();
            failures = 0;
            continue;
        }
        failures += 1;
        let delay = pace::jitter(backoff.next_wait(), 0.5, 1.0);
        let loud = failures == 1 || failures.is_multiple_of(WARN_EVERY);
        if loud && !cluster.is_ready() {
            warn!(cluster = %cluster.name, %error, retry_in = ?delay,
                "etcd: no backend set yet; the cluster is not ready (/readyz 503) until the first list");
        } else if loud {
            let known = cluster.backends().backends.len();
            warn!(cluster = %cluster.name, %error, backends = known, retry_in = ?delay,
                "etcd unreachable; routing continues on the last known backend set");
        } else {
            debug!(cluster = %cluster.name, %error, retry_in = ?delay, "etcd still unreachable");
        }
        cluster.source.set_failed(error);
        cluster.stats.discovery_failed();
        tokio::time::sleep(delay).await;
    }
}

/// What the task knows of the prefix: the keys and what they decoded to, and the revision.
struct PrefixState {
    cluster: Arc<Cluster>,
    /// `PREFIX/`, with the slash, so `svc` does not pick up `svc-canary/...`.
    key_prefix: String,
    format: EtcdFormat,
    /// Key -> backend, for every key whose value decoded to one.
    keys: BTreeMap<String, Endpoint>,
    /// Keys whose value could not be decoded; each is logged once, when it turns bad.
    invalid: HashSet<String>,
    /// The newest revision applied; 0 before the first list.
    revision: i64,
}

/// What a watch response asks of the task.
enum Next {
    Continue,
    Relist,
}

impl PrefixState {
    fn new(cluster: Arc<Cluster>, source: &EtcdDiscovery) -> PrefixState {
        PrefixState {
            cluster,
            key_prefix: format!("{}/", source.prefix.0),
            format: source.format,
            keys: BTreeMap::new(),
            invalid: HashSet::new(),
            revision: 0,
        }
    }

    /// Connects, lists when needed, and follows the watch until something fails. Returns the
    /// failure, and whether this session got anywhere (a list, or a confirmed watch).
    async fn session(&mut self, etcd: &ClientConfig) -> (String, bool) {
        // A list of a large prefix on a slow link may take longer than a dial.
        let request_timeout = etcd.dial_timeout.max(REQUEST_TIMEOUT_MIN);
        let mut client = match connect(etcd).await {
            Ok(client) => client,
            Err(error) => return (error, false),
        };
        let mut progressed = false;
        loop {
            if self.revision == 0 {
                if let Err(error) = self.list(&mut client, request_timeout).await {
                    return (error, progressed);
                }
                progressed = true;
                self.cluster.source.set_connected();
            }
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.revision + 1);
            let mut stream = match timeout(
                request_timeout,
                client.watch(self.key_prefix.as_str(), Some(options)),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return (format!("cannot watch: {error}"), progressed),
                Err(_) => return (format!("no watch within {request_timeout:?}"), progressed),
            };
            // The first response confirms the watch (or reports the revision compacted).
            let mut first = true;
            loop {
                let message = if first {
                    match timeout(request_timeout, stream.message()).await {
                        Ok(message) => message,
                        Err(_) => {
                            return (
                                format!("watch not confirmed within {request_timeout:?}"),
                                progressed,
                            )
                        }
                    }
                } else {
                    stream.message().await
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return ("etcd closed the watch".into(), progressed),
                    Err(error) => return (format!("watch failed: {error}"), progressed),
                };
                match self.on_watch_response(response) {
                    Ok(Next::Continue) => {}
                    Ok(Next::Relist) => {
                        self.revision = 0;
                        break;
                    }
                    Err(error) => return (error, progressed),
                }
                if first {
                    first = false;
                    progressed = true;
                    if !self.cluster.source.is_connected() {
                        info!(cluster = %self.cluster.name, revision = self.revision,
                            "etcd watch established");
                    }
                    self.cluster.source.set_connected();
                }
            }
        }
    }

    /// Replaces what is known with a fresh listing of the prefix.
    async fn list(&mut self, client: &mut Client, request_timeout: Duration) -> Result<(), String> {
        let options = GetOptions::new().with_prefix();
        let response = match timeout(
            request_timeout,
            client.get(self.key_prefix.as_str(), Some(options)),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(format!("cannot list {}: {error}", self.key_prefix)),
            Err(_) => return Err(format!("no list within {request_timeout:?}")),
        };
        let Some(header) = response.header() else {
            return Err("etcd answered the list without a header".into());
        };
        let revision = header.revision();
        self.keys.clear();
        let mut listed = HashSet::new();
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            self.put(&key, kv.value());
            listed.insert(key);
        }
        self.invalid.retain(|key| listed.contains(key));
        self.revision = revision;
        debug!(cluster = %self.cluster.name, revision, keys = listed.len(), "etcd: listed prefix");
        self.publish();
        Ok(())
    }

    fn on_watch_response(&mut self, response: WatchResponse) -> Result<Next, String> {
        if response.compact_revision() > 0 {
            info!(cluster = %self.cluster.name, from = self.revision + 1,
                compacted_to = response.compact_revision(),
                "etcd compacted the revisions this watch needed; listing the prefix again");
            return Ok(Next::Relist);
        }
        if response.canceled() {
            return Err(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ));
        }
        if response.events().is_empty() {
            return Ok(Next::Continue);
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match event.event_type() {
                EventType::Put => self.put(&key, kv.value()),
                EventType::Delete => {
                    self.keys.remove(&key);
                    self.invalid.remove(&key);
                }
            }
            self.revision = self.revision.max(kv.mod_revision());
        }
        self.publish();
        Ok(Next::Continue)
    }

    /// Records what one key's value says. A value that cannot be decoded is skipped (the key
    /// names no backend) and logged once, with the key.
    fn put(&mut self, key: &str, value: &[u8]) {
        let tls = self.cluster.settings.upstream.tls.is_some();
        match formats::decode(self.format, value) {
            Ok(Decoded::Backend(endpoint)) => {
                self.invalid.remove(key);
                self.keys.insert(key.to_string(), endpoint);
            }
            Ok(Decoded::TlsBackend(endpoint)) if tls => {
                self.invalid.remove(key);
                self.keys.insert(key.to_string(), endpoint);
            }
            Ok(Decoded::TlsBackend(endpoint)) => {
                let why = format!(
                    "{} has isSecure=true, and the cluster has no `tls`: add `tls:` to the cluster to route it",
                    endpoint.address.0
                );
                self.skip(key, &why);
            }
            Ok(Decoded::Removed) => {
                self.invalid.remove(key);
                self.keys.remove(key);
            }
            Err(why) => self.skip(key, &why),
        }
    }

    /// The key names no backend; logged once, when it turns bad.
    fn skip(&mut self, key: &str, why: &str) {
        self.keys.remove(key);
        if self.invalid.insert(key.to_string()) {
            warn!(cluster = %self.cluster.name, key, error = %why,
                "etcd: skipping a value that cannot be decoded");
        }
    }

    /// Swaps the cluster's backend set for the decoded keys. Two keys with one address (a
    /// service registered twice) are one backend, with the larger weight.
    fn publish(&self) {
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(self.keys.len());
        let mut index: HashMap<&BackendAddr, usize> = HashMap::new();
        for endpoint in self.keys.values() {
            match index.get(&endpoint.address) {
                Some(&i) => endpoints[i].weight = endpoints[i].weight.max(endpoint.weight),
                None => {
                    index.insert(&endpoint.address, endpoints.len());
                    endpoints.push(endpoint.clone());
                }
            }
        }
        super::apply(&self.cluster, &endpoints);
        self.cluster.source.set_revision(self.revision);
        self.cluster.source.set_invalid_values(self.invalid.len());
    }
}
