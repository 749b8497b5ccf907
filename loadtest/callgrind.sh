#!/usr/bin/env bash
# Instructions per small call through sluice, counted by valgrind's callgrind: deterministic for
# one binary and load, so it shows changes that wall-clock figures on this noisy machine hide.
# h2load (Debian package nghttp2-client) sends unary echo calls with a 100-byte payload over one
# connection with 16 streams: WARMUP calls, then counters are zeroed, then CALLS calls.
#
#   loadtest/callgrind.sh                                  # target/release/sluice, config/bench.yaml
#   SLUICE_BIN=/tmp/old/sluice loadtest/callgrind.sh       # another build, to compare
#   CONFIG=/tmp/other.yaml CALLS=8000 loadtest/callgrind.sh
#   KEEP=/tmp/profile loadtest/callgrind.sh                # keep the profile for callgrind_annotate
#
# Prints "instructions/call N". Everything listens on 127.0.0.1 (ports of config/bench.yaml);
# every step is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

CALLS=${CALLS:-4000}
WARMUP=${WARMUP:-1000}
CONFIG=${CONFIG:-$ROOT/config/bench.yaml}
command -v h2load >/dev/null || { log "h2load missing: apt-get install nghttp2-client"; exit 2; }
command -v valgrind >/dev/null || { log "valgrind missing: apt-get install valgrind"; exit 2; }
find_binaries
SLUICE=${SLUICE_BIN:-$SLUICE}
WORK=$(mktemp -d /tmp/sluice-callgrind.XXXXXX)
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

"$LOADTEST" backend --port 50081 --id b1 >>"$WORK/backends.log" 2>&1 & STARTED_PIDS+=($!)
"$LOADTEST" backend --port 50082 --id b2 >>"$WORK/backends.log" 2>&1 & STARTED_PIDS+=($!)
wait_port 50081; wait_port 50082

valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out.%p" \
  "$SLUICE" run --config "$CONFIG" >>"$WORK/sluice.log" 2>&1 &
PROXY_PID=$!; STARTED_PIDS+=($PROXY_PID)
for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/50080) 2>/dev/null && break; sleep 0.1; done

# One EchoRequest { message: "bench", payload: 100 bytes } in a gRPC frame.
python3 - "$WORK/body.bin" <<'PY'
import sys
msg = b"\x0a\x05bench" + b"\x12\x64" + b"x" * 100
open(sys.argv[1], "wb").write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
PY
load() {
  timeout 600 h2load -n "$1" -c 1 -m 16 -d "$WORK/body.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    http://127.0.0.1:50080/echo.v1.Echo/Unary >"$WORK/h2load.log" 2>&1
  grep -q "$1 succeeded" "$WORK/h2load.log" || { log "h2load failed:"; tail -5 "$WORK/h2load.log" >&2; exit 1; }
}
load "$WARMUP"
timeout 60 callgrind_control --zero "$PROXY_PID" >/dev/null
load "$CALLS"
timeout 60 callgrind_control --dump "$PROXY_PID" >/dev/null
sleep 1
total=$(cat "$WORK"/callgrind.out.* | awk '/^summary:/ {s += $2} END {print s}')
# The dump after --zero holds only the counted calls; the summary lines of earlier parts are 0.
echo "instructions/call $((total / CALLS))"
# KEEP=DIR keeps the profile, for callgrind_annotate.
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$WORK"/callgrind.out.*.* "$KEEP"/; fi
