#!/usr/bin/env bash
# Builds and checks the sluice image on a machine that cannot pull images or run containers
# (docs/docker.md, "Building without a registry"). As root, with podman and debootstrap:
#
#   docker/build-local.sh           # bases (first time: ~5 min), image (~4 min cold), checks
#   docker/build-local.sh --check   # only the checks, against the image built last
#
# 1. Base images from Debian's archive: debootstrap a minimal bookworm, trim it as Debian's
#    "slim" images are trimmed, and `podman import` it under the tag the Dockerfile names. The
#    builder base is the same Debian with gcc, cmake and protoc, plus this machine's Rust
#    toolchain (`rustc --print sysroot`), passed in with --build-arg RUST_IMAGE.
# 2. `podman build -f docker/Dockerfile` (chroot isolation: no container runtime needed), both
#    targets: sluice and loadgen.
# 3. The image's filesystem as a container sees it (`podman image mount`, then chroot, as the
#    image's user and with its environment): `sluice --version`, `sluice check` of sluice.yaml,
#    etcd.yaml and etcd-tracing.yaml, then sluice run there and its HEALTHCHECK command asked
#    against it.
# 4. docker/compose.yaml validated by `podman-compose config` and `docker-compose config`, both
#    installed from PyPI into a venv under the work folder (or named by PODMAN_COMPOSE and
#    DOCKER_COMPOSE).
#
# Leaves the images localhost/sluice:VERSION and localhost/sluice-loadgen:VERSION, also tagged
# latest (the tags docker/compose.yaml names). Work files (root filesystems, the venv) go to
# $SLUICE_DOCKER_WORK, /var/tmp/sluice-docker by default.
set -euo pipefail
shopt -s inherit_errexit # errors inside $(...) stop the script too
cd "$(dirname "$0")/.."

work=${SLUICE_DOCKER_WORK:-/var/tmp/sluice-docker}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
runtime_base=docker.io/library/debian:bookworm-slim
image=localhost/sluice:$version
loadgen=localhost/sluice-loadgen:$version
export BUILDAH_ISOLATION=chroot

# What a failed or interrupted run leaves behind: a sluice started from the image, the image's
# mount, docker-compose's copy of the compose file.
sluice_pid="" mounted=""
cleanup() {
  if [ -n "$sluice_pid" ]; then
    kill "$sluice_pid" 2>/dev/null || true
    wait "$sluice_pid" 2>/dev/null || true
  fi
  [ -z "$mounted" ] || podman image unmount "$image" >/dev/null || true
  rm -f docker/.compose-v1.yaml
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*" >&2; }
fail() {
  echo "docker/build-local.sh: $*" >&2
  exit 1
}

for tool in podman debootstrap rustc; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install podman debootstrap)"
done
[ "$(id -u)" -eq 0 ] || fail "run as root: debootstrap, podman image mount and chroot need it"

# A minimal bookworm in $work/rootfs-NAME with extra packages; kept between runs.
debian_rootfs() {
  local name=$1 include=$2 dir=$work/rootfs-$1
  if [ ! -e "$dir/.complete" ]; then
    say "debootstrap $name ($include)"
    rm -rf "$dir"
    mkdir -p "$work"
    debootstrap --variant=minbase --include="$include" bookworm "$dir" "$mirror" \
      >"$work/$name.log" 2>&1 || fail "debootstrap $name failed; see $work/$name.log"
    # What Debian's slim images leave out: package caches, documentation, other languages.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
      "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
    find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    touch "$dir/.complete"
  fi
  echo "$dir"
}

import_rootfs() {
  local dir=$1 tag=$2
  shift 2
  tar --exclude=./.complete -C "$dir" -c . | podman import "$@" - "$tag" >/dev/null
}

base_images() {
  local sysroot rust_version dir
  if ! podman image exists "$runtime_base"; then
    say "importing $runtime_base"
    # Like Debian's slim image, without ca-certificates: the Dockerfile copies the bundle.
    dir=$(debian_rootfs runtime debian-archive-keyring)
    import_rootfs "$dir" "$runtime_base" \
      --change 'CMD ["bash"]'
  fi
  sysroot=$(rustc --print sysroot)
  rust_version=$(rustc --version | awk '{print $2}')
  # A rustup toolchain: a folder of its own, not /usr (Debian's rustc is older than 1.88 anyway).
  [ "$sysroot" != /usr ] && [ -x "$sysroot/bin/cargo" ] ||
    fail "rustc at $sysroot is not a rustup toolchain; install Rust 1.88+ with rustup"
  builder_base=localhost/sluice-rust:$rust_version-bookworm
  if ! podman image exists "$builder_base"; then
    say "importing $builder_base (Rust $rust_version from $sysroot)"
    dir=$(debian_rootfs builder ca-certificates,gcc,libc6-dev,make,cmake,protobuf-compiler,libprotobuf-dev)
    rm -rf "$dir/usr/local/rust" && mkdir -p "$dir/usr/local/rust"
    cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$dir/usr/local/rust/"
    # cargo fetches crates with this machine's trust roots (which may include a proxy's CA);
    # the builder's own bundle, which the image copies, stays Debian's.
    cp /etc/ssl/certs/ca-certificates.crt "$dir/usr/local/rust/build-host-ca.crt"
    import_rootfs "$dir" "$builder_base" \
      --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV CARGO_HTTP_CAINFO=/usr/local/rust/build-host-ca.crt' \
      --change 'CMD ["bash"]'
  fi
}

build_images() {
  say "podman build $image"
  # --format docker: OCI images have no HEALTHCHECK.
  podman build --format docker -f docker/Dockerfile --build-arg RUST_IMAGE="$builder_base" \
    --target sluice -t "$image" -t localhost/sluice:latest .
  say "podman build $loadgen"
  podman build --format docker -f docker/Dockerfile --build-arg RUST_IMAGE="$builder_base" \
    --target loadgen -t "$loadgen" -t localhost/sluice-loadgen:latest .
}

check_image() {
  say "checking $image from inside its filesystem"
  local root user env=() size healthcheck
  root=$(podman image mount "$image")
  mounted=yes
  # Commands run as the image's user, with the image's environment, in its filesystem.
  user=$(podman image inspect --format '{{.Config.User}}' "$image")
  mapfile -t env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | sed '/^$/d')
  local in_image=(env -i "${env[@]}" chroot --userspec="$user" "$root")

  "${in_image[@]}" sluice --version
  "${in_image[@]}" sluice check --config /etc/sluice/sluice.yaml
  "${in_image[@]}" sluice check --config /etc/sluice/etcd.yaml
  "${in_image[@]}" sluice check --config /etc/sluice/etcd-tracing.yaml
  [ -s "$root/etc/ssl/certs/ca-certificates.crt" ] || fail "no CA certificates in the image"

  # The image's HEALTHCHECK, asked of a sluice running from the image's files. The host's
  # network: admin on a free loopback port instead of the image's 0.0.0.0:9901.
  healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$image")
  [[ $healthcheck == '["CMD","/usr/local/bin/sluice","health"]' ]] ||
    fail "unexpected HEALTHCHECK: $healthcheck"
  local port=$((20000 + RANDOM % 10000)) ok=""
  # env and chroot exec what they run, so $! is sluice itself.
  "${in_image[@]}" env SLUICE_LISTEN=127.0.0.1:0 SLUICE_ADMIN="127.0.0.1:$port" \
    sluice run --config /etc/sluice/sluice.yaml >"$work/run.log" 2>&1 &
  sluice_pid=$!
  for _ in $(seq 50); do
    if "${in_image[@]}" env SLUICE_ADMIN="127.0.0.1:$port" sluice health 2>/dev/null; then
      ok=yes
      break
    fi
    sleep 0.2
  done
  kill "$sluice_pid" && wait "$sluice_pid" || true
  sluice_pid=""
  [ -n "$ok" ] || fail "sluice health never passed; sluice's log: $(cat "$work/run.log")"
  echo "HEALTHCHECK $healthcheck: passes against sluice run from the image"
  podman image unmount "$image" >/dev/null
  mounted=""

  size=$(podman image inspect --format '{{.Size}}' "$image")
  echo "image $image: $((size / 1000000)) MB"
  size=$(podman image inspect --format '{{.Size}}' "$loadgen")
  echo "image $loadgen: $((size / 1000000)) MB"
}

# podman-compose has `config` from 1.1 (Debian 12 ships 1.0.3); docker-compose 1.29 checks every
# key against the Compose schema, so it catches a misspelt key. Both come from PyPI into a venv
# under $work, unless PODMAN_COMPOSE and DOCKER_COMPOSE name them. docker-compose 1.29 needs
# PyYAML 5, which builds only with Cython before 3.
compose_tools() {
  local venv=$work/venv
  if [ -z "${PODMAN_COMPOSE:-}" ] || [ -z "${DOCKER_COMPOSE:-}" ]; then
    if [ ! -x "$venv/bin/docker-compose" ] || [ ! -x "$venv/bin/podman-compose" ]; then
      say "installing podman-compose and docker-compose into $venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q "cython<3" wheel setuptools
      "$venv/bin/pip" install -q --no-build-isolation "pyyaml==5.4.1"
      "$venv/bin/pip" install -q docker-compose==1.29.2 podman-compose
    fi
  fi
  podman_compose=${PODMAN_COMPOSE:-$venv/bin/podman-compose}
  docker_compose=${DOCKER_COMPOSE:-$venv/bin/docker-compose}
}

check_compose() {
  say "validating docker/compose.yaml"
  local podman_compose docker_compose
  compose_tools
  "$podman_compose" -f docker/compose.yaml config >/dev/null
  "$podman_compose" -f docker/compose.yaml --profile loadgen config >/dev/null
  "$podman_compose" -f docker/compose.yaml --profile tracing config >/dev/null
  echo "podman-compose config: valid"
  # docker-compose 1.29 predates the top-level `name`, so it gets the file without that line.
  sed '/^name: /d' docker/compose.yaml >docker/.compose-v1.yaml
  "$docker_compose" -f docker/.compose-v1.yaml --profile loadgen config --quiet
  "$docker_compose" -f docker/.compose-v1.yaml --profile tracing config --quiet
  rm -f docker/.compose-v1.yaml
  echo "docker-compose config: valid"
}

if [ "${1:-}" != "--check" ]; then
  base_images
  build_images
fi
check_image
check_compose
say "all checks passed"
