//! Active `grpc.health.v1` checks (`clusters[].health_check`, off unless configured).
//!
//! One task per cluster, on the discovery runtime, off the data plane. Every `interval`
//! (±10%), each backend gets a `Check` for the configured `service`, bounded by `timeout`, on
//! a connection of its own (so a check measures the backend, not the load on the calls'
//! connections). `unhealthy_threshold` failures in a row (NOT_SERVING, a timeout, a transport
//! error) take a backend out of rotation: it gets no new calls, calls already running on it
//! finish. `healthy_threshold` passes bring it back. A backend without the health service
//! (UNIMPLEMENTED) is logged once and treated as healthy.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::sync::Arc;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tracing::{debug, info, warn};

use crate::balance::{Backend, Cluster};
use crate::config::{ClusterConfig, HealthCheck};
use crate::pace;
use crate::sync::AbortOnDrop;
use crate::telemetry::HealthResult;
use crate::transport::leg;
use crate::transport::{ConnectError, H2Settings, Pool, UpstreamPolicy};
use crate::wire::Code;

/// The checker tasks of one config generation; dropping it stops them.
pub type Checkers = AbortOnDrop;

/// Starts a checker for each cluster whose config has `health_check`.
pub fn start(clusters: &[(Arc<Cluster>, &ClusterConfig)], runtime: &Handle) -> Checkers {
    let tasks = clusters
        .iter()
        .filter_map(|(cluster, config)| {
            let check = config.health_check.clone()?;
            Some(runtime.spawn(check_cluster(Arc::clone(cluster), check)))
        })
        .collect();
    AbortOnDrop::new(tasks)
}

async fn check_cluster(cluster: Arc<Cluster>, config: HealthCheck) {
    let mut pools: HashMap<String, Pool> = HashMap::new();
    let mut without_service: HashSet<String> = HashSet::new();
    let interval = config.interval.0;
    loop {
        tokio::time::sleep(pace::jitter(interval, 0.9, 1.1)).await;
        let backends = cluster.backends().backends.clone();
        pools.retain(|address, _| backends.iter().any(|b| b.address.0 == *address));
        let mut checks = JoinSet::new();
        for backend in &backends {
            let pool = pools.entry(backend.address.0.clone()).or_default().clone();
            let (backend, config) = (Arc::clone(backend), config.clone());
            // The checks' connections are the calls' kind (TLS, keepalive, idle timeout), with
            // the check's own timeout on the connect.
            let policy = UpstreamPolicy {
                connect_timeout: config.timeout.0,
                ..cluster.settings.upstream.clone()
            };
            checks.spawn(async move {
                let result = check(&pool, &backend.address.0, &config, &policy).await;
                (backend, result)
            });
        }
        while let Some(Ok((backend, checked))) = checks.join_next().await {
            let address = &backend.address.0;
            if checked.result == HealthResult::Unimplemented
                && without_service.insert(address.clone())
            {
                info!(cluster = %cluster.name, backend = %address,
                    "backend has no grpc.health.v1 service; treated as healthy");
            }
            judge(&cluster, &backend, checked, &config);
        }
    }
}

/// Counts one check and logs a change of verdict, with the last failure's cause.
fn judge(cluster: &Cluster, backend: &Backend, checked: Checked, config: &HealthCheck) {
    let Checked { result, cause } = checked;
    backend.stats.record_health(result);
    if let Some(cause) = &cause {
        debug!(cluster = %cluster.name, backend = %backend.address, result = result.label(),
            %cause, "health check failed");
    }
    let (unhealthy, healthy) = (config.unhealthy_threshold.0, config.healthy_threshold.0);
    let cause = cause.as_deref().unwrap_or("the backend says NOT_SERVING");
    match backend.health_checked(result.passed(), unhealthy, healthy) {
        Some(false) => warn!(cluster = %cluster.name, backend = %backend.address,
            result = result.label(), cause,
            "backend unhealthy: failed its health checks; no new calls"),
        Some(true) => info!(cluster = %cluster.name, backend = %backend.address,
            "backend healthy again: passed its health checks"),
        None => {}
    }
}

/// Why a check found no verdict in the backend's answer: what the log says of a failed
/// check (the metric counts it as `error`).
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("connect failed: {0}")]
    Connect(#[from] ConnectError),
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("cannot build the request: {0}")]
    Request(#[from] http::Error),
    #[error("the answer is over {MAX_ANSWER} bytes")]
    TooLong,
    #[error("the answer is not a HealthCheckResponse")]
    Malformed,
    #[error("the backend answered {0:?}")]
    Status(Code),
}

/// One check's result, and for a failure, why.
struct Checked {
    result: HealthResult,
    cause: Option<String>,
}

/// One `Check`, bounded by the configured timeout.
async fn check(
    pool: &Pool,
    address: &str,
    config: &HealthCheck,
    policy: &UpstreamPolicy,
) -> Checked {
    let timeout = config.timeout.0;
    let exchange = ask(pool, address, &config.service, policy);
    let (result, cause) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(result)) => (result, None),
        Ok(Err(error)) => (HealthResult::Error, Some(error.to_string())),
        Err(_) => (
            HealthResult::Timeout,
            Some(format!("no answer within {timeout:?}")),
        ),
    };
    Checked { result, cause }
}

/// The largest health answer read; a real one is a few bytes.
const MAX_ANSWER: usize = 1024;

async fn ask(
    pool: &Pool,
    address: &str,
    service: &str,
    policy: &UpstreamPolicy,
) -> Result<HealthResult, CheckError> {
    let (sender, _slot) = pool
        .acquire(address, policy, &H2Settings::default())
        .await?;
    let mut sender = sender.ready().await?;
    let request = http::Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())?;
    let (head, ()) = request.into_parts();
    let (response, mut body) = leg::send_request(&mut sender, &head, &[], false)?;
    let message = HealthCheckRequest {
        service: service.to_string(),
    };
    body.send_data(grpc_frame(&message.encode_to_vec()), true)?;
    let (head, mut answer) = response.await?.into_parts();
    if answer.is_end_stream() {
        // Trailers-only: a status and no message.
        return no_answer(Code::of_headers(&head.headers));
    }
    let mut bytes = BytesMut::new();
    while let Some(chunk) = poll_fn(|cx| answer.poll_data(cx)).await {
        let chunk = chunk?;
        leg::Source::release_capacity(&mut answer, chunk.len());
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_ANSWER {
            return Err(CheckError::TooLong);
        }
    }
    let trailers = poll_fn(|cx| answer.poll_trailers(cx))
        .await?
        .unwrap_or_default();
    match Code::of_headers(&trailers) {
        Code::Ok => serving(&bytes),
        code => no_answer(code),
    }
}

fn no_answer(code: Code) -> Result<HealthResult, CheckError> {
    match code {
        Code::Unimplemented => Ok(HealthResult::Unimplemented),
        // The service asked about is unknown to the backend.
        Code::NotFound => Ok(HealthResult::NotServing),
        code => Err(CheckError::Status(code)),
    }
}

/// Reads the status of a length-prefixed `HealthCheckResponse`.
fn serving(frame: &[u8]) -> Result<HealthResult, CheckError> {
    let message = frame.get(5..).ok_or(CheckError::Malformed)?;
    match HealthCheckResponse::decode(message) {
        Ok(answer) if answer.status == ServingStatus::Serving as i32 => Ok(HealthResult::Serving),
        Ok(_) => Ok(HealthResult::NotServing),
        Err(_) => Err(CheckError::Malformed),
    }
}

/// A gRPC message frame: not compressed, 4-byte length, the message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.extend_from_slice(message);
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_their_status_says() {
        let answer = |status: ServingStatus| {
            let message = HealthCheckResponse {
                status: status as i32,
            };
            grpc_frame(&message.encode_to_vec())
        };
        let serving = |frame: &[u8]| serving(frame).map_err(|e| e.to_string());
        assert_eq!(
            serving(&answer(ServingStatus::Serving)),
            Ok(HealthResult::Serving)
        );
        let not_serving = serving(&answer(ServingStatus::NotServing));
        assert_eq!(not_serving, Ok(HealthResult::NotServing));
        let malformed = "the answer is not a HealthCheckResponse".to_string();
        assert_eq!(serving(&[0, 0]), Err(malformed));
        let no_answer = |code| no_answer(code).map_err(|e| e.to_string());
        assert_eq!(
            no_answer(Code::Unimplemented),
            Ok(HealthResult::Unimplemented)
        );
        let unavailable = "the backend answered Unavailable".to_string();
        assert_eq!(no_answer(Code::Unavailable), Err(unavailable));
    }
}
