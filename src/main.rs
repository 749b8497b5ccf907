//! The `sluice` command line (docs/operations.md lists the commands and signals).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sluice::config::{parse_duration, Config, LogFormat};
use sluice::demo::{ClientTls, PemPair};
use sluice::register::{RegisterFormat, Registration};
use sluice::server::{takeover, RunOptions};
use sluice::BoxError;
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
    /// When no subcommand is given (`run` is the default).
    #[command(flatten)]
    config: ConfigFile,
}

/// `--config`, as `run`, `check` and the bare command take it.
#[derive(Args)]
struct ConfigFile {
    /// Config file.
    #[arg(
        long = "config",
        value_name = "FILE",
        default_value = "config/sluice.yaml"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run {
        #[command(flatten)]
        config: ConfigFile,
        /// Take the listening sockets over from a running sluice, then send it SIGQUIT.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the config file: print problems, exit 0 (valid) or 1 (invalid).
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Register one backend in etcd under a lease, keep it alive, delete it on SIGINT/SIGTERM
    /// (for services that cannot register themselves).
    Register(RegisterArgs),
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
    DemoClient(DemoClientArgs),
    /// One echo backend (echo.v1.Echo and grpc.health.v1), for tests and experiments.
    EchoBackend(EchoBackendArgs),
    /// Runtime overrides: drain, undrain or weigh a backend, set a split's weights, list them;
    /// through one instance's admin endpoint, or for the whole fleet through etcd.
    Ctl(CtlArgs),
}

#[derive(Args)]
#[command(
    after_help = "ACTIONS:\n  drain CLUSTER BACKEND        no new calls; calls in flight finish\n  undrain CLUSTER BACKEND\n  weight CLUSTER BACKEND N     1 to 100, or `default` for discovery's weight\n  split ROUTE CLUSTER=W ...    a split's weights (or `split ROUTE default`)\n  overrides                    what is overridden now\n  status                       the fleet's instances and their revisions (--etcd); exit 1 if one lags"
)]
struct CtlArgs {
    /// One instance's admin endpoint, HOST:PORT (unused with --etcd).
    #[arg(long, env = "SLUICE_ADMIN")]
    admin: Option<String>,
    /// The fleet's etcd, http://HOST:PORT (comma-separated for several).
    #[arg(long)]
    etcd: Option<String>,
    /// With --etcd: the fleet's `overrides.etcd_prefix`.
    #[arg(long, default_value = "sluice/overrides")]
    prefix: String,
    /// With --etcd: the fleet's `fleet.etcd_prefix`, for `status`.
    #[arg(long, default_value = "sluice/fleet")]
    fleet_prefix: String,
    /// With --admin: a file holding the admin bearer token (`admin.token_file`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The action and its arguments.
    #[arg(required = true, num_args = 1..)]
    action: Vec<String>,
}

#[derive(Args)]
struct RegisterArgs {
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
}

#[derive(Args)]
struct DemoClientArgs {
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
}

#[derive(Args)]
struct EchoBackendArgs {
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
    /// A slow tail: this share of unary calls (0 to 1), at random, waits --tail-delay more.
    #[arg(long, default_value_t = 0.0)]
    tail_fraction: f64,
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    tail_delay: std::time::Duration,
    /// Serve TLS with this certificate chain (PEM); with --tls-key.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
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
        Command::Run { config, upgrade } => run(config.path, upgrade),
        Command::Check { config } => return check(&config.path),
        Command::Register(args) => register(args),
        Command::Health { admin, timeout } => return health(&admin, timeout),
        Command::Demo => {
            init_logging(None, LogFormat::Plain);
            sluice::demo::run_demo()
        }
        Command::DemoClient(args) => demo_client(args),
        Command::EchoBackend(args) => echo_backend(args),
        Command::Ctl(args) => return ctl(args),
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

/// `sluice run`: loads the config, then logs as it says.
fn run(path: PathBuf, upgrade: bool) -> Result<(), BoxError> {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            init_logging(None, LogFormat::Plain);
            return Err(error.into());
        }
    };
    init_logging(config.log.level.as_deref(), config.log.format);
    let options = RunOptions {
        config_path: Some(path),
        upgrade,
    };
    sluice::server::run(config, options)
}

/// `sluice check`: the file's `${VAR}` expansions (secrets hidden), then "valid", or the
/// first problem.
fn check(path: &Path) -> ExitCode {
    let checked = Config::load(path)
        .map_err(BoxError::from)
        .and_then(|config| {
            sluice::server::check_files(&config, &path.display().to_string()).map(|()| config)
        });
    let config = match checked {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    for expansion in &config.expansions {
        // A password in a CI log is a leaked password.
        let value = match expansion.secret {
            true => "(hidden)",
            false => expansion.expanded.as_str(),
        };
        let (line, column, written) = (expansion.line, expansion.column, &expansion.written);
        println!("{}:{line}:{column}: {written} = {value}", path.display());
    }
    println!("{}: valid", path.display());
    ExitCode::SUCCESS
}

fn register(args: RegisterArgs) -> Result<(), BoxError> {
    init_logging(None, LogFormat::Plain);
    let RegisterArgs {
        etcd,
        prefix,
        addr,
        ttl,
        metadata,
        format,
    } = args;
    let registration = Registration::new(&etcd, &prefix, &addr, ttl, metadata.as_deref(), format)?;
    sluice::register::run(registration)
}

/// `sluice health`: exit 0 when the admin endpoint answers /healthz with 200.
fn health(admin: &str, timeout: std::time::Duration) -> ExitCode {
    let checked = sluice::probe::probe_address(admin)
        .and_then(|address| sluice::probe::check(address, timeout));
    match checked {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice health: {error}");
            ExitCode::FAILURE
        }
    }
}

fn demo_client(args: DemoClientArgs) -> Result<(), BoxError> {
    // Its errors are printed once, by main; tonic's own log lines would repeat them.
    init_logging(Some("off"), LogFormat::Plain);
    let identity = PemPair::from_flags(args.cert, args.key, "--cert and --key")?;
    let wanted = args.tls || args.ca.is_some() || identity.is_some() || args.server_name.is_some();
    let tls = wanted.then_some(ClientTls {
        ca: args.ca,
        identity,
        server_name: args.server_name,
    });
    sluice::demo::run_demo_client(&args.target, args.calls, tls)
}

fn echo_backend(args: EchoBackendArgs) -> Result<(), BoxError> {
    init_logging(None, LogFormat::Plain);
    let pool =
        (args.workers).map(|n| sluice::demo::WorkerPool::new(n, args.work, args.checks_context));
    let tls = PemPair::from_flags(args.tls_cert, args.tls_key, "--tls-cert and --tls-key")?;
    let tail = (args.tail_fraction > 0.0).then_some(sluice::demo::Tail {
        fraction: args.tail_fraction,
        delay: args.tail_delay,
    });
    sluice::demo::run_echo_backend(args.listen, args.id, (args.delay, tail), pool, tls)
}

/// `sluice ctl`: exit 0 when done, 1 on an error or an instance lagging behind.
fn ctl(args: CtlArgs) -> ExitCode {
    let action = match sluice::ctl::Action::parse(&args.action) {
        Ok(action) => action,
        Err(error) => {
            eprintln!("sluice ctl: {error}");
            return ExitCode::FAILURE;
        }
    };
    let target = match (args.etcd, args.admin) {
        (Some(etcd), _) => sluice::ctl::Target::Etcd {
            endpoints: etcd.split(',').map(|e| e.trim().to_string()).collect(),
            prefix: args.prefix.trim_end_matches('/').to_string(),
            fleet_prefix: args.fleet_prefix.trim_end_matches('/').to_string(),
        },
        (None, admin) => sluice::ctl::Target::Admin {
            address: admin.unwrap_or_else(|| "127.0.0.1:9901".into()),
            token_file: args.token_file,
        },
    };
    match sluice::ctl::run(target, action) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("sluice ctl: {error}");
            ExitCode::FAILURE
        }
    }
}
