//! CI's smoke of the three load scripts: each runs for seconds with tiny counts against the
//! debug binaries, and fails on any error or a lopsided share (the scripts check; see their
//! SMOKE branches). The full runs are on demand (README, "Benchmarks").

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding both binaries: `cargo nextest run --workspace` builds `sluice` too.
fn bin_dir() -> PathBuf {
    let loadtest = Path::new(env!("CARGO_BIN_EXE_sluice-loadtest"));
    let dir = loadtest.parent().expect("binary dir").to_path_buf();
    assert!(
        dir.join("sluice").exists(),
        "{} has no sluice binary: run the workspace's tests (cargo nextest run --workspace)",
        dir.display()
    );
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn smoke(script: &str) {
    smoke_with(script, &[]);
}

fn smoke_with(script: &str, args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new("bash")
        .arg(root.join("loadtest").join(script))
        .args(args)
        .current_dir(&root)
        .env("SMOKE", "1")
        .env("BIN_DIR", bin_dir())
        .env("PROXY_PORT", free_port().to_string())
        .env("B1_PORT", free_port().to_string())
        .env("B2_PORT", free_port().to_string())
        .env("B3_PORT", free_port().to_string())
        .env("ADMIN_PORT", free_port().to_string())
        .output()
        .expect("run bash");
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed:\n{out}\n{err}");
    eprintln!("{out}");
}

#[test]
fn bench_smoke() {
    smoke("bench.sh");
}

#[test]
fn hedging_smoke() {
    smoke("hedging.sh");
}

#[test]
fn incident_smoke() {
    smoke_with("incident.sh", &["--failure", "all"]);
}

#[test]
fn soak_smoke() {
    smoke("soak.sh");
}
