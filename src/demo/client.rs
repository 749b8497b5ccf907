//! `sluice demo-client`: calls on one connection, in cleartext or over TLS and mTLS, and how
//! many each backend answered.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig};

use super::pb::{self, EchoRequest};
use super::pem::{read_pem, PemPair};
use crate::BoxError;

/// How `sluice demo-client` reaches its target: cleartext, or TLS with these roots and,
/// for mTLS, this client certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust this CA's PEM file instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Present this certificate (mTLS).
    pub identity: Option<PemPair>,
    /// The name to verify the server's certificate against; default: the target's host.
    pub server_name: Option<String>,
}

impl ClientTls {
    fn config(&self) -> Result<ClientTlsConfig, BoxError> {
        let mut config = match &self.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some(pair) = &self.identity {
            config = config.identity(pair.identity()?);
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// An error with its causes: tonic's own says only "transport error".
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some errors print their cause in their own text already.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Why a call failed: its code, its message and what caused it, with a hint when a listener
/// that wants a client certificate got none (the handshake ends after it, at the first call).
fn call_failed(target: &str, status: &tonic::Status, tls: Option<&ClientTls>) -> String {
    let code = status.code();
    let Some(cause) = std::error::Error::source(status) else {
        return format!("call to {target} failed: {code:?}: {}", status.message());
    };
    let mut text = format!("call to {target} failed: {code:?}: {}", with_causes(cause));
    if tls.is_some_and(|tls| tls.identity.is_none()) {
        text.push_str(" (a listener with client_ca_file wants --cert and --key)");
    }
    text
}

/// `sluice demo-client`: `calls` unary calls on one HTTP/2 connection (over TLS with `tls`),
/// then how many each backend answered. Under an L4 balancer one backend would get them all.
pub fn run_demo_client(target: &str, calls: u32, tls: Option<ClientTls>) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{target}"))
            .map_err(|e| format!("--target {target}: {e}"))?;
        if let Some(tls) = &tls {
            endpoint = endpoint.tls_config(tls.config()?)?;
        }
        let channel = (endpoint.connect().await)
            .map_err(|e| format!("cannot connect to {target}: {}", with_causes(&e)))?;
        let mut client = pb::echo_client::EchoClient::new(channel);
        let mut per_backend = std::collections::BTreeMap::<String, u32>::new();
        for i in 0..calls {
            let request = EchoRequest {
                message: format!("hello {i}"),
                ..Default::default()
            };
            let response = (client.unary(request).await)
                .map_err(|status| call_failed(target, &status, tls.as_ref()))?;
            *per_backend
                .entry(response.into_inner().backend_id)
                .or_default() += 1;
        }
        let over = if tls.is_some() { " (TLS)" } else { "" };
        println!("{calls} calls on one connection to {target}{over}:");
        for (backend, count) in per_backend {
            println!("  {backend}: {count}");
        }
        Ok(())
    })
}
