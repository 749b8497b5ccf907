//! sluice: a gRPC-aware HTTP/2 proxy that balances every gRPC stream across backends.
//!
//! The modules form layers; each uses only the ones above it in this list (bottom first), and
//! docs/architecture.md walks one call through them:
//! - [`wire`]: gRPC rules: status codes, `grpc-timeout`, content types, the proxy's own
//!   trailers-only statuses.
//! - [`certs`]: certificates and keys from PEM: parsing, checks, names, expiry.
//! - [`sync`]: the poison-tolerant lock, and tasks aborted on drop; [`pace`]: backoff and
//!   jitter.
//! - [`config`]: the YAML config, parsed with spans, validated once; files read as a separate
//!   step. [`overrides`]: the operator's runtime overrides (drains, weights, splits).
//! - [`telemetry`]: counters and histograms, the `/metrics` exporter, the access log, trace ids,
//!   and each call's spans, exported over OTLP.
//! - [`transport`]: upstream HTTP/2 connections per backend (pool, sluice's own HTTP/2 client for
//!   that leg, write coalescing, settings).
//! - [`balance`]: clusters, a backend's load and state, the pick algorithms, the retry budget.
//! - [`discovery`]: sources that push backend sets into clusters: static lists, etcd watches.
//! - [`health`]: active grpc.health.v1 checks that take failing backends out of rotation.
//! - [`lifecycle`]: draining, open connections, readiness, shared by proxy and admin.
//! - [`proxy`]: one call's life: accept, route (header matches, splits, rate limits), pick,
//!   forward (with hedged attempts on routes that ask for them), answer.
//! - [`steering`]: overrides applied to the live clusters and routes; a fleet's through etcd.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/backends` and the status page.
//! - [`server`]: the wiring: pingora, listeners, signals, reload, drain.
//! - commands: [`ctl`] (`sluice ctl`), [`register`] (`sluice register`), [`probe`] (`sluice health`, the container's
//!   HEALTHCHECK) and [`demo`] (`sluice demo`, the echo backends of the demo and the tests);
//!   `main.rs` parses the command line.

pub mod admin;
pub mod balance;
pub mod certs;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod lifecycle;
pub mod overrides;
pub mod pace;
pub mod probe;
pub mod proxy;
pub mod register;
pub mod server;
pub mod steering;
pub mod sync;
pub mod telemetry;
pub mod transport;
pub mod wire;

/// A boxed error for cold paths (config, CLI, start-up), where the message is all that
/// matters.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
