//! `sluice demo`: three built-in echo backends on loopback and the proxy in front of them, with
//! no etcd and nothing else to install; and the echo backend and demo client it is made of.

mod client;
mod echo;
mod pem;

use tokio::net::TcpListener;

use crate::BoxError;

pub use client::{run_demo_client, ClientTls};
pub use echo::{
    run_echo_backend, serve_echo, serve_echo_with, status_details, EchoService, EchoStats, Tail,
    WorkerPool, MAX_MESSAGE_SIZE,
};
pub use pem::PemPair;

/// The generated code for `proto/echo.proto`.
pub mod pb {
    tonic::include_proto!("echo.v1");
}

/// The demo's addresses.
pub const DEMO_LISTEN: &str = "127.0.0.1:50051";
pub const DEMO_ADMIN: &str = "127.0.0.1:9901";
const DEMO_BACKEND_PORTS: [u16; 3] = [50061, 50062, 50063];

/// `sluice demo`: starts the three backends on a thread of their own, then the proxy.
pub fn run_demo() -> Result<(), BoxError> {
    let mut listeners = Vec::new();
    for port in DEMO_BACKEND_PORTS {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("demo backend: cannot listen on 127.0.0.1:{port}: {e}"))?;
        listener.set_nonblocking(true)?;
        listeners.push(listener);
    }
    std::thread::Builder::new()
        .name("demo-backends".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "demo backends cannot start");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (i, listener) in listeners.into_iter().enumerate() {
                    let id = format!("backend-{}", i + 1);
                    tasks.push(tokio::spawn(async move {
                        let listener = TcpListener::from_std(listener)?;
                        serve_echo(listener, EchoService::new(id)).await
                    }));
                }
                for task in tasks {
                    if let Ok(Err(error)) = task.await {
                        tracing::error!(%error, "demo backend stopped");
                    }
                }
            });
        })?;

    let backends: Vec<String> = DEMO_BACKEND_PORTS
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let yaml = format!(
        "listeners:\n  - name: grpc\n    address: \"{DEMO_LISTEN}\"\n\
         admin:\n  address: \"{DEMO_ADMIN}\"\n\
         clusters:\n  - name: echo\n    discovery:\n      static: [{}]\n",
        backends.join(", ")
    );
    let config = crate::config::Config::parse(&yaml, "demo config")?;
    eprintln!(
        "\nsluice demo: gRPC on {DEMO_LISTEN}, admin on http://{DEMO_ADMIN}, \
         3 echo backends on 127.0.0.1:{}-{}\n\n\
         See calls spread across the backends, 30 calls on ONE connection:\n\
         \x20   cargo run --release -- demo-client --calls 30\n\
         Live backend state:\n\
         \x20   curl -s http://{DEMO_ADMIN}/backends\n\
         With grpcurl, if you have it:\n\
         \x20   grpcurl -plaintext -proto proto/echo.proto -d '{{\"message\":\"hi\"}}' {DEMO_LISTEN} echo.v1.Echo/Unary\n\
         Stop with Ctrl-C.\n",
        DEMO_BACKEND_PORTS[0], DEMO_BACKEND_PORTS[2]
    );
    crate::server::run(config, crate::server::RunOptions::default())
}
