#!/usr/bin/env bash
# The soak: CALLS (default 1,000,000) calls through sluice at RATE per second (default 2,000) while
# sluice's RSS is sampled every 10 s. Target: after warm-up, RSS stays within ±5% of its median.
# Writes the curve to loadtest/RESULTS.md.
#
#   loadtest/soak.sh                                # about 9 minutes
#   SMOKE=1 loadtest/soak.sh                        # seconds (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

SMOKE=${SMOKE:-0}
CALLS=${CALLS:-1000000}
RATE=${RATE:-2000}
EVERY=${EVERY:-10s}
RESULTS_MD=${RESULTS_MD:-$ROOT/loadtest/RESULTS.md}
if [ "$SMOKE" = 1 ]; then CALLS=3000; RATE=1000; EVERY=1s; fi
find_binaries
PIN_PROXY=""
WORK=$(mktemp -d /tmp/sluice-soak.XXXXXX)
PROXY_PORT=${PROXY_PORT:-21070}
BACKEND1=127.0.0.1:${B1_PORT:-21071}
BACKEND2=127.0.0.1:${B2_PORT:-21072}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

"$LOADTEST" backend --port "${BACKEND1##*:}" --id b1 >>"$WORK/backends.log" 2>&1 & STARTED_PIDS+=($!)
"$LOADTEST" backend --port "${BACKEND2##*:}" --id b2 >>"$WORK/backends.log" 2>&1 & STARTED_PIDS+=($!)
wait_port "${BACKEND1##*:}"; wait_port "${BACKEND2##*:}"
start_proxy sluice
log "soak: $CALLS calls at $RATE/s through sluice (pid $PROXY_PID), RSS every $EVERY"
timeout $((CALLS / RATE + 120)) "$LOADTEST" soak --target "127.0.0.1:$PROXY_PORT" --connections 4 \
  --rate "$RATE" --calls "$CALLS" --watch-pid "$PROXY_PID" --sample-every "$EVERY" --json >"$WORK/soak.json"
stop_proxy

python3 - "$WORK/soak.json" "$SMOKE" >"$WORK/section.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); smoke = sys.argv[2] == "1"
load = r["load"]
print("## Soak")
print()
print(f"{load['calls']:,} calls at {load['calls_per_second']:,.0f}/s, errors {load['errors']}, "
      f"p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms. sluice RSS after warm-up (the first quarter) "
      f"stays within {r['max_deviation']*100:.1f}% of its median (target ±5%).")
print()
print("| t (s) | RSS (MiB) |")
print("| --- | --- |")
for t, kib in r["rss_kib"]:
    print(f"| {t:.0f} | {kib/1024:.1f} |")
if load["errors"] > 0:
    print(f"soak: {load['errors']} errors", file=sys.stderr); sys.exit(3)
if smoke and not r["rss_kib"]:
    print("soak: no RSS samples", file=sys.stderr); sys.exit(3)
PY
cat "$WORK/section.md"
if [ "$SMOKE" != 1 ]; then
  { cat "$WORK/section.md"; echo; echo "Command: \`loadtest/soak.sh\` (CALLS=$CALLS RATE=$RATE) on $(machine_line)."; } >"$WORK/s2.md"
  write_section soak "$WORK/s2.md"
  log "wrote $RESULTS_MD"
fi
