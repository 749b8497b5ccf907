#!/usr/bin/env bash
# grpc-go's interop client through a TLS sluice listener to a TLS grpc-go interop server.
# Both use grpc-go's own test CA (testdata/ca.pem, a server certificate for *.test.google.fr):
# sluice serves that certificate to the client and checks it on the backend.
#
#   GRPC_GO_SRC=~/src/grpc-go loadtest/interop.sh
#
# GRPC_GO_SRC is a git clone of github.com/grpc/grpc-go. The interop programs are built from
# its tag GRPC_GO_REF (default v1.33.3, the version Debian packages) against Debian's Go
# packages, without a Go module proxy:
#   apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev
# (golang-github-golang-protobuf-1-5-dev is downloaded and unpacked next to the build, because
# Debian's grpc package pulls in the 1.3 series it conflicts with.)
# Runs every standard case that needs no Google credentials, prints one line per case and
# writes the table to loadtest/RESULTS.md. Exits non-zero when a case fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh
RESULTS_MD=${RESULTS_MD:-$ROOT/loadtest/RESULTS.md}
: "${GRPC_GO_SRC:?set GRPC_GO_SRC to a git clone of github.com/grpc/grpc-go}"
GRPC_GO_REF=${GRPC_GO_REF:-v1.33.3}
CASES="empty_unary large_unary client_streaming server_streaming ping_pong empty_stream
  timeout_on_sleeping_server cancel_after_begin cancel_after_first_response
  status_code_and_message special_status_message custom_metadata unimplemented_method
  unimplemented_service"
PROXY_PORT=50543 BACKEND_PORT=50544 ADMIN_PORT=9943

WORK=$(mktemp -d /tmp/sluice-interop.XXXXXX)
trap 'cleanup; rm -rf "$WORK"' EXIT
find_binaries

build_interop() {  # the client and server at $GRPC_GO_REF, in a GOPATH overlaid on Debian's
  local gopath=$WORK/go grpc=$WORK/go/src/google.golang.org/grpc
  command -v go >/dev/null || { log "go is missing: apt-get install golang-go"; exit 2; }
  [ -d /usr/share/gocode/src/google.golang.org/grpc ] && [ -d /usr/share/gocode/src/google.golang.org/protobuf ] ||
    { log "apt-get install golang-google-grpc-dev golang-google-protobuf-dev"; exit 2; }
  mkdir -p "$grpc" "$gopath/src/github.com/golang" "$WORK/deb"
  cp -r /usr/share/gocode/src/google.golang.org/grpc/. "$grpc"
  git -C "$GRPC_GO_SRC" archive "$GRPC_GO_REF" interop testdata | tar -x -C "$grpc"
  (cd "$WORK/deb" && apt-get download -q golang-github-golang-protobuf-1-5-dev >/dev/null 2>&1 &&
    dpkg-deb -x golang-github-golang-protobuf-1-5-dev_*.deb .)
  cp -r "$WORK/deb/usr/share/gocode/src/github.com/golang/protobuf" "$gopath/src/github.com/golang/"
  for program in client server; do
    GOPATH=$gopath:/usr/share/gocode GO111MODULE=off GOFLAGS= \
      go build -o "$WORK/interop_$program" "google.golang.org/grpc/interop/$program"
  done
  TESTDATA=$grpc/testdata
}

write_config() {
  cat >"$WORK/sluice.yaml" <<EOF
listeners:
  - name: grpc
    address: "127.0.0.1:$PROXY_PORT"
    tls: { cert_file: $TESTDATA/server1.pem, key_file: $TESTDATA/server1.key }
admin:
  address: "127.0.0.1:$ADMIN_PORT"
clusters:
  - name: interop
    discovery:
      static: ["127.0.0.1:$BACKEND_PORT"]
    tls: { ca_file: $TESTDATA/ca.pem, server_name: foo.test.google.fr }
routes:
  - cluster: interop
EOF
}

log "building grpc-go's interop client and server at $GRPC_GO_REF"
build_interop
write_config
"$WORK/interop_server" -use_tls -port "$BACKEND_PORT" >"$WORK/server.log" 2>&1 &
STARTED_PIDS+=($!)
wait_port "$BACKEND_PORT"
"$SLUICE" run --config "$WORK/sluice.yaml" >"$WORK/sluice.log" 2>&1 &
STARTED_PIDS+=($!)
wait_port "$PROXY_PORT" || { tail -20 "$WORK/sluice.log" >&2; exit 1; }

failed=0
{
  echo "## grpc-go interop through TLS sluice"
  echo
  echo "grpc-go $GRPC_GO_REF interop client (\`-use_tls -use_test_ca\`) → sluice TLS listener →"
  echo "grpc-go interop server (\`-use_tls\`), with grpc-go's test CA on both legs. Commit"
  echo "$(git rev-parse --short HEAD); $(machine_line). Command: \`GRPC_GO_SRC=... loadtest/interop.sh\`."
  echo
  echo "| case | result |"
  echo "| --- | --- |"
} >"$WORK/section.md"
for case in $CASES; do
  if timeout 60 "$WORK/interop_client" -use_tls -use_test_ca \
    -server_host_override foo.test.google.fr -server_port "$PROXY_PORT" \
    -test_case "$case" >"$WORK/client-$case.log" 2>&1; then
    result=pass
  else
    result="FAIL: $(tail -1 "$WORK/client-$case.log")"
    failed=$((failed + 1))
  fi
  echo "$case: $result"
  echo "| $case | $result |" >>"$WORK/section.md"
done
write_section interop "$WORK/section.md"
[ "$failed" -eq 0 ] || { log "$failed case(s) failed; sluice's log:"; tail -20 "$WORK/sluice.log" >&2; exit 1; }
log "all cases passed"
