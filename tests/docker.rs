//! The container image and the compose file: `docker/build-local.sh` builds the image with podman
//! from locally made Debian bases, checks its filesystem from inside (binary, libraries, default
//! config, HEALTHCHECK) and validates `docker/compose.yaml` (docs/docker.md).
//!
//! Skipped, with a message, where podman or debootstrap is missing or the user is not root:
//! `scripts/setup` installs
//! neither, so CI skips this and runs the same topology as processes in `tests/stack.rs`. The
//! first run here takes about 10 minutes; later ones rebuild only what changed.

use std::process::Command;

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|out| out.status.success())
}

#[test]
fn image_builds_and_its_filesystem_runs_sluice() {
    for tool in ["podman", "debootstrap"] {
        if !installed(tool) {
            eprintln!(
                "skipped: `{tool}` is not installed (apt-get install podman debootstrap); \
                 see docs/docker.md, \"Building without a registry\""
            );
            return;
        }
    }
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    if !uid.is_ok_and(|uid| uid == b"0\n") {
        eprintln!(
            "skipped: docker/build-local.sh needs root (debootstrap, podman image mount, chroot)"
        );
        return;
    }
    let out = Command::new("docker/build-local.sh")
        .output()
        .expect("run docker/build-local.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "build-local.sh failed:\n{stdout}\n{stderr}"
    );
    let version = format!("sluice {}", env!("CARGO_PKG_VERSION"));
    assert!(
        stdout.contains(&version),
        "no `{version}` from the image:\n{stdout}"
    );
    for config in [
        "/etc/sluice/sluice.yaml: valid",
        "/etc/sluice/etcd.yaml: valid",
    ] {
        assert!(stdout.contains(config), "no `{config}`:\n{stdout}");
    }
    assert!(
        stdout.contains("${SLUICE_ADMIN:-127.0.0.1:9901} = 0.0.0.0:9901"),
        "{stdout}"
    );
    assert!(
        stdout.contains("passes against sluice run from the image"),
        "{stdout}"
    );
    assert!(
        stdout.contains("config: valid"),
        "compose file not validated:\n{stdout}"
    );
}
