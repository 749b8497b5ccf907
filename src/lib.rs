//! sluice: a gRPC-aware HTTP/2 proxy that balances every gRPC stream across backends.
//!
//! The modules, in the order a call meets them:
//! - [`server`]: process lifecycle: the pingora `Server`, listeners, signals, readiness.
//! - [`proxy`]: one call's life: accept, route, pick, forward, answer (gRPC rules in
//!   `proxy::grpc`, stream piping in `proxy::forward`, upstream connections in `proxy::pool`).
//! - [`balance`]: clusters, backends and the pick algorithms.
//! - [`discovery`]: sources that feed backend sets into clusters: static lists, etcd watches
//!   (value formats in `discovery::formats`).
//! - [`register`]: `sluice register`, keeping one backend registered in etcd under a lease.
//! - [`metrics`]: the Prometheus registry behind `/metrics`.
//! - [`config`]: the YAML config, validated once at load.
//! - [`access_log`]: one JSON line per finished call, and the trace id it carries.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/backends` and the status page.
//! - [`demo`]: the built-in echo backends of `sluice demo` and of the tests.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod metrics;
pub mod proxy;
pub mod register;
pub mod server;
