//! The `sluice` command line (docs/operations.md lists the commands and signals).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::config::{parse_duration, Config, LogFormat};
use sluice::demo::{ClientTls, PemPair};
use sluice::register::{RegisterFormat, Registration};
use sluice::server::{takeover, RunOptions};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Per call, sluice allocates a task, h2 stream state and header maps. mimalloc cut the
/// instructions per small call by 7% against glibc's malloc (80.7k -> 75.0k, callgrind; see
/// loadtest/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A gRPC-aware HTTP/2 proxy that balances every gRPC stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file, when no subcommand is given (`run` is the default).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

const DEFAULT_CONFIG: &str = "config/sluice.yaml";

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Take the listening sockets over from a running sluice, then send it SIGQUIT.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the config file: print problems, exit 0 (valid) or 1 (invalid).
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Register one backend in etcd under a lease, keep it alive, delete it on SIGINT/SIGTERM
    /// (for services that cannot register themselves).
    Register {
        /// etcd client URL(s), comma-separated: http://HOST:PORT
        #[arg(long)]
        etcd: String,
        /// Key prefix the cluster watches, e.g. `services/echo` (the key goes under `PREFIX/`).
        #[arg(long)]
        prefix: String,
        /// The backend's address, HOST:PORT.
        #[arg(long)]
        addr: String,
        /// Lease TTL: how long the key outlives this process if it dies without deregistering.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// JSON metadata (etcd-naming only), e.g. '{"weight":3}'.
        #[arg(long)]
        metadata: Option<String>,
        /// Value format: etcd-naming (JSON, key PREFIX/ADDR) or plain (address, key PREFIX/LEASE).
        #[arg(long, value_enum, default_value_t = RegisterFormat::EtcdNaming)]
        format: RegisterFormat,
    },
    /// Ask a running sluice's admin endpoint for /healthz: exit 0 when it answers 200, else 1
    /// (the container image's HEALTHCHECK).
    Health {
        /// The admin address (admin.address); 0.0.0.0 or [::] is asked on loopback.
        #[arg(long, env = "SLUICE_ADMIN", default_value = "127.0.0.1:9901")]
        admin: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// The proxy plus three built-in echo backends on loopback; no etcd needed.
    Demo,
    /// Call the demo (or any echo.v1 proxy) on one connection and count answers per backend.
    DemoClient {
        /// HOST:PORT. Over TLS, the server's certificate is checked against HOST.
        #[arg(long, default_value = sluice::demo::DEMO_LISTEN)]
        target: String,
        #[arg(long, default_value_t = 30)]
        calls: u32,
        /// Call over TLS, trusting the system's roots (implied by --ca, --cert, --key).
        #[arg(long)]
        tls: bool,
        /// Trust this CA (PEM) instead of the system's roots.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Present this certificate chain (PEM) for mTLS; with --key.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The private key (PEM) of --cert.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Check the server's certificate against this name instead of the target's host.
        #[arg(long)]
        server_name: Option<String>,
    },
    /// One echo backend (echo.v1.Echo and grpc.health.v1), for tests and experiments.
    EchoBackend {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        id: String,
        /// Added to every call, e.g. `50ms`, to play a slow backend.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        delay: std::time::Duration,
        /// Unary calls queue for one of this many workers (a server's fixed pool); queued
        /// work is done even after the caller has gone, unless --checks-context.
        #[arg(long)]
        workers: Option<usize>,
        /// With --workers: how long each call works once it has a worker.
        #[arg(long, default_value = "25ms", value_parser = parse_duration)]
        work: std::time::Duration,
        /// With --workers: drop queued calls whose caller has gone or whose deadline passed.
        #[arg(long)]
        checks_context: bool,
        /// Serve TLS with this certificate chain (PEM); with --tls-key.
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long)]
        tls_key: Option<PathBuf>,
    },
}

fn init_logging(config_level: Option<&str>, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter(config_level.unwrap_or("info"))))
        .unwrap_or_else(|_| EnvFilter::new(default_filter("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // pingora's once-a-second ERROR while `run --upgrade` waits for the sockets is expected:
    // sluice logs the wait itself (server/takeover.rs).
    let quiet = filter_fn(|metadata| !takeover::is_waiting_noise(metadata));
    let _ = match format {
        // Colours only on a terminal: a log file or journald gets plain text.
        LogFormat::Plain => (builder.with_ansi(std::io::stderr().is_terminal()))
            .finish()
            .with(quiet)
            .try_init(),
        // Fields beside the message, not nested: what log pipelines index.
        LogFormat::Json => (builder.json().flatten_event(true))
            .finish()
            .with(quiet)
            .try_init(),
    };
}

/// `level`, with pingora's own start-up lines ("Starting service: BG rates") kept to warnings
/// and errors when `level` is a plain `info`, `debug` or `trace`. Any other filter (`warn`,
/// `sluice=debug`, one naming pingora) is taken as written.
fn default_filter(level: &str) -> String {
    match level.trim().to_ascii_lowercase().as_str() {
        "info" | "debug" | "trace" => format!("{level},pingora_core=warn"),
        _ => level.to_string(),
    }
}

/// `demo-client`'s TLS flags: `None` for cleartext.
fn demo_client_tls(
    tls: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
) -> Result<Option<ClientTls>, sluice::BoxError> {
    let identity = PemPair::from_flags(cert, key, "--cert and --key")?;
    let wanted = tls || ca.is_some() || identity.is_some() || server_name.is_some();
    Ok(wanted.then_some(ClientTls {
        ca,
        identity,
        server_name,
    }))
}

fn main() -> ExitCode {
    // No transparent huge pages for this process. mimalloc asks for them on its regions, and
    // where THP is "always" (the default of many distributions) every region a thread touches
    // then costs a 2 MiB page: 20 MiB idle instead of 10, and 93 MiB instead of 52 for 10,000
    // held streams (loadtest/RESULTS.md, "Memory per stream"). A proxy's heap is small;
    // huge pages buy it nothing. mimalloc is also built to do this itself before main
    // (.cargo/config.toml); this call keeps it so where a CFLAGS of one's own overrides that.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run {
        config: cli.config,
        upgrade: false,
    });
    let result = match command {
        Command::Run {
            config: path,
            upgrade,
        } => match Config::load(&path) {
            Ok(config) => {
                init_logging(config.log.level.as_deref(), config.log.format);
                let options = RunOptions {
                    config_path: Some(path),
                    upgrade,
                };
                sluice::server::run(config, options)
            }
            Err(error) => {
                init_logging(None, LogFormat::Plain);
                Err(error.into())
            }
        },
        Command::Check { config: path } => match Config::load(&path) {
            Ok(config) => match sluice::server::check_files(&config, &path.display().to_string()) {
                Ok(()) => {
                    for expansion in &config.expansions {
                        // A password in a CI log is a leaked password.
                        let value = match expansion.secret {
                            true => "(hidden)",
                            false => expansion.expanded.as_str(),
                        };
                        let (line, column) = (expansion.line, expansion.column);
                        let written = &expansion.written;
                        println!("{}:{line}:{column}: {written} = {value}", path.display());
                    }
                    println!("{}: valid", path.display());
                    return ExitCode::SUCCESS;
                }
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::FAILURE;
                }
            },
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::FAILURE;
            }
        },
        Command::Register {
            etcd,
            prefix,
            addr,
            ttl,
            metadata,
            format,
        } => {
            init_logging(None, LogFormat::Plain);
            match Registration::new(&etcd, &prefix, &addr, ttl, metadata.as_deref(), format) {
                Ok(registration) => sluice::register::run(registration),
                Err(error) => Err(error.into()),
            }
        }
        Command::Health { admin, timeout } => {
            let checked = sluice::probe::probe_address(&admin)
                .and_then(|address| sluice::probe::check(address, timeout));
            return match checked {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("sluice health: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Demo => {
            init_logging(None, LogFormat::Plain);
            sluice::demo::run_demo()
        }
        Command::DemoClient {
            target,
            calls,
            tls,
            ca,
            cert,
            key,
            server_name,
        } => {
            // Its errors are printed once, below; tonic's own log lines would repeat them.
            init_logging(Some("off"), LogFormat::Plain);
            demo_client_tls(tls, ca, cert, key, server_name)
                .and_then(|tls| sluice::demo::run_demo_client(&target, calls, tls))
        }
        Command::EchoBackend {
            listen,
            id,
            delay,
            workers,
            work,
            checks_context,
            tls_cert,
            tls_key,
        } => {
            init_logging(None, LogFormat::Plain);
            let pool = workers.map(|n| sluice::demo::WorkerPool::new(n, work, checks_context));
            PemPair::from_flags(tls_cert, tls_key, "--tls-cert and --tls-key")
                .and_then(|tls| sluice::demo::run_echo_backend(listen, id, delay, pool, tls))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("sluice: {error}");
            ExitCode::FAILURE
        }
    }
}
