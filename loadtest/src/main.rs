//! `sluice-loadtest`: the load generator and test backends behind `loadtest/bench.sh`,
//! `loadtest/incident.sh` and `loadtest/soak.sh` (see `loadtest/RESULTS.md`).

mod backend;
mod client;
mod incident;
mod overload;
mod soak;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub use sluice::demo::pb;

#[derive(Parser)]
#[command(
    name = "sluice-loadtest",
    about = "gRPC load generator and backends for sluice's benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A duration such as `500ms`, `10s` or `2m`: the config file's syntax.
use sluice::config::parse_duration as duration;

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Where to send calls: HOST:PORT, or several, comma-separated (connections take turns).
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<String>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Concurrent streams per connection (closed loop).
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Stop after this many calls.
    #[arg(long)]
    calls: Option<u64>,
    /// Stop after this long (with --kind hold: how long the streams are held).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
    /// Open loop: this many calls per second, latency measured from each intended send time.
    #[arg(long)]
    rate: Option<f64>,
    /// Request payload bytes (echoed back).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    #[arg(long, value_enum, default_value = "unary")]
    kind: client::Kind,
    /// Responses per server-stream call.
    #[arg(long, default_value_t = 1)]
    messages: u32,
    /// Each call's deadline (sent as grpc-timeout and as x-deadline-unix-ms).
    #[arg(long, value_parser = duration)]
    deadline: Option<Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Speak TLS to the target, trusting the CA in this PEM file.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// With --tls-ca: the name to check in the target's certificate (sent as SNI).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// Closed loop: each worker opens a new connection after this many calls (with TLS, a
    /// new handshake): the connection-churn scenario.
    #[arg(long)]
    calls_per_connection: Option<u64>,
}

impl LoadArgs {
    fn options(&self) -> Result<client::RunOptions, String> {
        let tls = match &self.tls_ca {
            Some(path) => Some(client::Tls {
                ca_pem: std::fs::read_to_string(path)
                    .map_err(|e| format!("--tls-ca {}: {e}", path.display()))?,
                name: self.tls_name.clone(),
            }),
            None => None,
        };
        Ok(client::RunOptions {
            targets: self.target.clone(),
            connections: self.connections,
            streams: self.streams,
            calls: self.calls,
            duration: self.duration,
            rate: self.rate,
            payload: self.payload,
            kind: self.kind,
            messages: self.messages,
            deadline: self.deadline,
            progress: !self.json && std::io::stderr().is_terminal(),
            tls,
            calls_per_connection: self.calls_per_connection,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Send load and report calls/s, latency percentiles, codes and each backend's share.
    Run(LoadArgs),
    /// An echo backend that names itself in `x-backend-id`, and can turn slow.
    Backend {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        id: String,
        /// Added to every call.
        #[arg(long, default_value = "0ms", value_parser = duration)]
        delay: Duration,
        /// Turn slow this long after start.
        #[arg(long, value_parser = duration)]
        slow_after: Option<Duration>,
        /// Added to every call once slow.
        #[arg(long, default_value = "500ms", value_parser = duration)]
        slow_delay: Duration,
        /// Once slow, keep working on calls whose caller gave up (concurrency grows).
        #[arg(long)]
        leak: bool,
        /// Calls working at once; the rest queue (a server's thread pool).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Replay the incident sluice was built for through the proxy at --target.
    Incident {
        #[arg(long)]
        target: String,
        /// The two backend ports the proxy's config names.
        #[arg(long, value_delimiter = ',', default_value = "21091,21092")]
        backend_ports: Vec<u16>,
        #[arg(long, default_value = "10s", value_parser = duration)]
        slow_after: Duration,
        #[arg(long, default_value = "500ms", value_parser = duration)]
        slow_delay: Duration,
        #[arg(long, default_value = "30s", value_parser = duration)]
        duration: Duration,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value = "1s", value_parser = duration)]
        deadline: Duration,
        /// The slow backend's workers; calls beyond them queue.
        #[arg(long, default_value_t = 16)]
        slow_workers: usize,
        /// How backend 2 fails: slow (--slow-delay more a call, --slow-workers, leaking),
        /// fail-fast (UNAVAILABLE at once), hang (stopped: nothing read or written), overload
        /// (4 workers of 1 + 50 ms each: about 78 calls/s, below its share).
        #[arg(long, value_enum, default_value = "slow")]
        failure: backend::Failure,
        #[arg(long)]
        json: bool,
    },
    /// Overload the whole service behind the proxy at --target: backends with a few workers
    /// each, calls offered open loop at a multiple of their capacity. Reports goodput and the
    /// work started after its caller's deadline.
    Overload {
        #[command(flatten)]
        options: overload::OverloadOptions,
        #[arg(long)]
        json: bool,
    },
    /// Run load while sampling a process's RSS (the soak).
    Soak {
        #[command(flatten)]
        load: LoadArgs,
        /// The proxy's PID.
        #[arg(long)]
        watch_pid: u32,
        #[arg(long, default_value = "10s", value_parser = duration)]
        sample_every: Duration,
    },
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("sluice-loadtest: cannot encode the report: {error}"),
    }
}

async fn main_async(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Run(args) => {
            let report = client::run(args.options()?).await?;
            if args.json {
                print_json(&report);
            } else {
                report.print();
            }
        }
        Command::Backend {
            port,
            id,
            delay,
            slow_after,
            slow_delay,
            leak,
            workers,
        } => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .map_err(|e| format!("--port {port}: {e}"))?;
            let backend = backend::LoadBackend::new(backend::BackendOptions {
                id,
                delay,
                slow_after,
                slow_delay,
                leak,
                workers,
                failure: backend::Failure::Slow,
                detached: false,
            });
            backend::serve(listener, backend)
                .await
                .map_err(|e| e.to_string())?;
        }
        Command::Incident {
            target,
            backend_ports,
            slow_after,
            slow_delay,
            duration,
            rate,
            deadline,
            slow_workers,
            failure,
            json,
        } => {
            let [b1, b2] = backend_ports[..] else {
                return Err("--backend-ports: two ports, such as 21091,21092".into());
            };
            let report = incident::run(incident::IncidentOptions {
                target,
                backend_ports: [b1, b2],
                slow_after,
                slow_delay,
                duration,
                rate,
                deadline,
                slow_workers,
                failure,
            })
            .await?;
            if json {
                print_json(&report);
            } else {
                report.print();
            }
        }
        Command::Overload { options, json } => {
            let report = overload::run(options).await?;
            if json {
                print_json(&report);
            } else {
                report.print();
            }
        }
        Command::Soak {
            load,
            watch_pid,
            sample_every,
        } => {
            let report = soak::run(load.options()?, watch_pid, sample_every).await?;
            if load.json {
                print_json(&report);
            } else {
                report.load.print();
                for (t, rss) in &report.rss_kib {
                    println!("  t={t:7.1}s  rss={rss} KiB");
                }
                println!(
                    "RSS after warm-up stays within {:.1}% of its median",
                    report.max_deviation * 100.0
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice-loadtest: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice-loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}
