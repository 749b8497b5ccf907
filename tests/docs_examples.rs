//! The docs' examples work as printed. A code block in `docs/` or the README that follows a
//! marker `<!-- docs-example NAME: STEP -->` is one step of example NAME:
//!
//! - `run`: a shell block, run with bash in a scratch folder; it must succeed;
//! - `start`: a shell block that starts processes in the background (`&`); they are stopped
//!   when the test ends, and the next step waits until sluice is ready;
//! - `config FILE`: a config, saved as FILE in the scratch folder;
//! - `parses`: a config that must parse (its files need not exist).
//!
//! The one change made to the text: fixed ports (50051, 9901, ...) become free ones, so the
//! test runs beside others. `sluice` is the binary under test, first on `PATH`.

mod support;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The fixed ports the examples use.
const EXAMPLE_PORTS: [u16; 6] = [50051, 50052, 50061, 50062, 50063, 9901];

/// One step of an example, in the order the docs give them.
#[derive(Debug)]
enum Step {
    Run(String),
    Start(String),
    Config(String, String),
    Parses(String),
}

/// The steps of example `name` in `doc` (a path from the repository's root).
fn steps(doc: &str, name: &str) -> Vec<Step> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let marker = format!("<!-- docs-example {name}: ");
    let mut found = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(&marker) {
        rest = &rest[at + marker.len()..];
        let (step, after) = rest.split_once(" -->\n").expect("a marker ends with -->");
        let fence = after
            .strip_prefix("```")
            .expect("a code block right after the marker");
        let body = fence.split_once('\n').expect("a fenced block").1;
        let body = body[..body.find("```").expect("the block ends")].to_string();
        found.push(match step.split_once(' ') {
            Some(("config", file)) => Step::Config(file.to_string(), body),
            None if step == "run" => Step::Run(body),
            None if step == "start" => Step::Start(body),
            None if step == "parses" => Step::Parses(body),
            _ => panic!("{doc}: unknown docs-example step {step:?}"),
        });
        rest = after;
    }
    assert!(!found.is_empty(), "{doc}: no docs-example {name}");
    found
}

/// A scratch folder with free ports for the examples' fixed ones, and the processes the
/// example started, stopped on drop.
struct Scratch {
    dir: tempfile::TempDir,
    ports: HashMap<u16, u16>,
    groups: Vec<u32>,
}

impl Scratch {
    fn new() -> Scratch {
        let ports = EXAMPLE_PORTS
            .iter()
            .map(|p| (*p, support::unused_port()))
            .collect();
        Scratch {
            dir: tempfile::tempdir().unwrap(),
            ports,
            groups: Vec::new(),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `text` with each example port, after a colon, replaced by its free port.
    fn localise(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (fixed, free) in &self.ports {
            text = text.replace(&format!(":{fixed}"), &format!(":{free}"));
        }
        text
    }

    fn bash(&self, script: &str) -> Command {
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice")).parent().unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c", &self.localise(script)])
            .current_dir(self.dir.path())
            .env("PATH", path);
        command
    }

    /// Runs `script` to its end; it must succeed.
    fn run(&self, script: &str) -> Output {
        let output = self.bash(script).output().expect("run bash");
        assert!(
            output.status.success(),
            "{script}\nfailed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Runs `script`, which starts processes in the background, in a process group of its
    /// own; their output goes to `log`.
    fn start(&mut self, script: &str, log: &str) {
        let out = std::fs::File::create(self.path(log)).unwrap();
        let mut child = (self.bash(script).process_group(0))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start bash");
        self.groups.push(child.id());
        let status = child.wait().unwrap();
        assert!(status.success(), "{script}\nfailed: {}", self.read(log));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap_or_default()
    }

    /// Waits until the admin endpoint on the example's port 9901 says ready.
    async fn wait_ready(&self, log: &str) {
        let admin = format!("127.0.0.1:{}", self.ports[&9901]).parse().unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = support::http_get(admin, "/readyz").await;
            if answer.is_ok_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                Instant::now() < end,
                "sluice never became ready:\n{}",
                self.read(log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for group in &self.groups {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{group}")])
                .status();
        }
    }
}

/// Runs example `name` of docs/configuration.md step by step in a scratch folder: its
/// commands, configs and background processes (waiting until sluice is ready after each
/// start). Returns the folder, which stops the processes when dropped, and the outputs of the
/// `run` steps.
async fn run_example(name: &str) -> (Scratch, Vec<Output>) {
    let mut scratch = Scratch::new();
    let mut outputs = Vec::new();
    for step in steps("docs/configuration.md", name) {
        match step {
            Step::Run(script) => outputs.push(scratch.run(&script)),
            Step::Config(file, body) => {
                std::fs::write(scratch.path(&file), scratch.localise(&body)).unwrap()
            }
            Step::Start(script) => {
                scratch.start(&script, "started.log");
                scratch.wait_ready("started.log").await;
            }
            Step::Parses(_) => panic!("example {name} runs; it has no parse-only step"),
        }
    }
    (scratch, outputs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_example_runs_as_printed() {
    let (scratch, outputs) = run_example("tls").await;
    let log = scratch.read("started.log");
    // The config, with the certificates the commands made, passes `sluice check`.
    assert!(log.contains("tls.yaml: valid"), "{log}");
    // A TLS call and an mTLS call, three each, answered by the TLS backend.
    let calls = String::from_utf8_lossy(&outputs.last().unwrap().stdout).into_owned();
    assert_eq!(calls.matches("(TLS):").count(), 2, "{calls}");
    assert_eq!(calls.matches("b1: 3").count(), 2, "{calls}");
    // The mTLS listener refuses a client without a certificate, and says what is missing.
    let refused = scratch
        .bash("sluice demo-client --target localhost:50051 --ca certs/ca.pem --calls 1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("wants --cert and --key"), "{said}");
    // The client's identity reached the access log, as the text says.
    assert!(log.contains(r#""client_subject":"CN=client-a""#), "{log}");
    let sans = r#""client_sans":["DNS:client-a.example.org","URI:spiffe://example.org/client-a"]"#;
    assert!(log.contains(sans), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_web_example_runs_as_printed() {
    let (_scratch, outputs) = run_example("grpc-web").await;
    let preflight = String::from_utf8_lossy(&outputs.last().unwrap().stdout).into_owned();
    assert!(preflight.starts_with("HTTP/1.1 204"), "{preflight}");
    assert!(
        preflight.contains("access-control-allow-origin: http://localhost:3000"),
        "{preflight}"
    );
    assert!(
        preflight.contains("access-control-max-age: 600"),
        "{preflight}"
    );
}

#[test]
fn the_smallest_config_passes_check_and_the_complete_one_parses() {
    let scratch = Scratch::new();
    for step in steps("docs/configuration.md", "smallest") {
        let Step::Config(file, body) = step else {
            panic!("the smallest example is one config");
        };
        std::fs::write(scratch.path(&file), body).unwrap();
        let output = scratch.run(&format!("sluice check --config {file}"));
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(said.contains(&format!("{file}: valid")), "{said}");
    }
    for step in steps("docs/configuration.md", "complete") {
        let Step::Parses(body) = step else {
            panic!("the complete example is one config that parses");
        };
        if let Err(error) = sluice::config::Config::parse(&body, "the complete example") {
            panic!("{error}");
        }
    }
}
