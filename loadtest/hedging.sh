#!/usr/bin/env bash
# Hedged requests against a slow tail: three echo backends on which 1% of calls, at random, take
# 200 ms more; sluice with its default config, and the same with `hedging: { delay: p95 }` on
# the route, in alternating rounds of the same run. Reports p50/p99/p99.9 and the extra attempts
# (hedges sent per call). Then the whole service overloaded (backends with 2 workers each, load
# at twice their capacity): hedging must stop by itself. Writes the "hedging" section of
# loadtest/RESULTS.md.
#
#   loadtest/hedging.sh                 # about 3 minutes (ROUNDS=3, DURATION=20s, RATE=500)
#   SMOKE=1 loadtest/hedging.sh         # seconds (CI): checks the script and that nothing fails
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

SMOKE=${SMOKE:-0}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-20s}
RATE=${RATE:-500}
TAIL=${TAIL:-0.01}
TAIL_DELAY=${TAIL_DELAY:-200ms}
RESULTS_MD=${RESULTS_MD:-$ROOT/loadtest/RESULTS.md}
if [ "$SMOKE" = 1 ]; then ROUNDS=1; DURATION=2s; RATE=200; fi
find_binaries
WORK=$(mktemp -d /tmp/sluice-hedging.XXXXXX)
PROXY_PORT=${PROXY_PORT:-21100}
ADMIN_PORT=${ADMIN_PORT:-$((PROXY_PORT + 10))}
PORTS=("${B1_PORT:-21101}" "${B2_PORT:-21102}" "${B3_PORT:-21103}")
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

start_backends() {  # start_backends EXTRA-ARGS...: three sluice echo-backends
  local i
  BACKEND_PIDS=()
  for i in 0 1 2; do
    "$SLUICE" echo-backend --listen "127.0.0.1:${PORTS[$i]}" --id "b$((i + 1))" "$@" \
      >>"$WORK/backends.log" 2>&1 &
    BACKEND_PIDS+=($!); STARTED_PIDS+=($!)
  done
  for i in 0 1 2; do wait_port "${PORTS[$i]}"; done
}

stop_backends() {
  local pid
  for pid in "${BACKEND_PIDS[@]}"; do stop_pid "$pid"; done
}

write_conf() {  # write_conf FILE HEDGING: sluice's defaults, one route, HEDGING its hedging key
  cat >"$1" <<CONF
listeners:
  - name: grpc
    address: "127.0.0.1:$PROXY_PORT"
admin:
  address: "127.0.0.1:$ADMIN_PORT"
upgrade_sock: "$WORK/sluice_upgrade.sock"
log:
  level: warn
clusters:
  - name: echo
    discovery:
      static: ["127.0.0.1:${PORTS[0]}", "127.0.0.1:${PORTS[1]}", "127.0.0.1:${PORTS[2]}"]
routes:
  - name: echo
    cluster: echo
$2
CONF
}

start_sluice() {  # start_sluice HEDGING
  write_conf "$WORK/sluice.yaml" "$1"
  "$SLUICE" run --config "$WORK/sluice.yaml" >>"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!; STARTED_PIDS+=("$PROXY_PID")
  wait_port "$PROXY_PORT" || { tail -20 "$WORK/proxy.log" >&2; return 1; }
}

# The hedges sluice sent (every result), from /metrics.
hedges_sent() {
  python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^sluice_hedges_total\{/ {sum += $2} END {print sum + 0}'
}

# run NAME HEDGING LOAD-ARGS...: one measured run; appends a JSON line to $WORK/runs.jsonl.
run() {
  local name=$1 hedging=$2 report hedges
  shift 2
  start_sluice "$hedging"
  # Warm-up: the balancer's and the hedge delay's view of latency.
  timeout 60 "$LOADTEST" run --target "127.0.0.1:$PROXY_PORT" --rate "$RATE" --duration 2s \
    --connections 4 --json >/dev/null
  local before; before=$(hedges_sent)
  report=$(timeout 120 "$LOADTEST" run --target "127.0.0.1:$PROXY_PORT" --connections 4 --json "$@")
  hedges=$(( $(hedges_sent) - before ))
  echo "{\"name\":\"$name\",\"hedges\":$hedges,\"report\":$report}" >>"$WORK/runs.jsonl"
  log "$name: $(echo "$report" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("%d calls, p50 %.2f ms, p99 %.2f ms, errors %d" % (r["calls"], r["p50_ms"], r["p99_ms"], r["errors"]))'), hedges $hedges"
  stop_pid "$PROXY_PID"
}

HEDGE_ON="    hedging: { delay: p95, max_attempts: 2, budget_ratio: 0.02 }"
log "slow tail: $TAIL of calls +$TAIL_DELAY on three backends; $ROUNDS rounds of $DURATION at $RATE/s"
start_backends --tail-fraction "$TAIL" --tail-delay "$TAIL_DELAY"
for round in $(seq 1 "$ROUNDS"); do
  run "off" "" --rate "$RATE" --duration "$DURATION"
  run "on" "$HEDGE_ON" --rate "$RATE" --duration "$DURATION"
done
stop_backends

# The whole service overloaded: 2 workers of 25 ms a backend (240 calls/s in all), offered at
# twice that with a 1 s deadline. sluice sheds; hedging must stop.
log "overloaded: backends with 2 workers each, $((2 * 240)) calls/s offered"
start_backends --workers 2 --work 25ms --tail-fraction "$TAIL" --tail-delay "$TAIL_DELAY"
run "on, overloaded" "$HEDGE_ON" --rate 480 --duration "$DURATION" --deadline 1s
stop_backends

python3 - "$WORK/runs.jsonl" "$SMOKE" >"$WORK/table.md" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]; smoke = sys.argv[2] == "1"
print("| run | calls | p50 ms | p99 ms | p99.9 ms | errors | hedges per call |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in runs:
    rep = r["report"]; calls = max(rep["calls"], 1)
    print(f"| {r['name']} | {rep['calls']:,} | {rep['p50_ms']:.2f} | {rep['p99_ms']:.2f} | "
          f"{rep['p999_ms']:.2f} | {rep['errors']} | {100 * r['hedges'] / calls:.2f}% |")
def median(name, key):
    return statistics.median(r["report"][key] for r in runs if r["name"] == name)
extra = [100 * r["hedges"] / max(r["report"]["calls"], 1) for r in runs if r["name"] == "on"]
print()
for key, label in (("p99_ms", "p99"), ("p999_ms", "p99.9")):
    off, on = median("off", key), median("on", key)
    print(f"Median {label}: {off:.2f} ms without hedging, {on:.2f} ms with it ({100 * (1 - on / off):.0f}% lower).")
print(f"Hedges per call with hedging on: {', '.join(f'{e:.2f}%' for e in extra)}.")
errors = sum(r["report"]["errors"] for r in runs if r["name"] in ("on", "off"))
if errors:
    print(f"hedging: {errors} calls failed without overload", file=sys.stderr); sys.exit(3)
PY
cat "$WORK/table.md"
if [ "$SMOKE" != 1 ]; then
  {
    echo "### The latest hedging run: $TAIL of calls $TAIL_DELAY slower"
    echo
    echo "\`loadtest/hedging.sh\` on $(machine_line), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo "Three \`sluice echo-backend\`s, each delaying $TAIL of its calls by $TAIL_DELAY at random;"
    echo "sluice with its defaults and one route, open loop at $RATE calls/s over 4 connections,"
    echo "$DURATION a run after a 2 s warm-up, hedging off and on alternating. \"on, overloaded\":"
    echo "backends with 2 workers of 25 ms each (240 calls/s in all) offered 480 calls/s with a 1 s deadline."
    echo
    cat "$WORK/table.md"
  } >"$WORK/section.md"
  write_section "${RESULTS_SECTION:-hedging}" "$WORK/section.md"
  log "wrote $RESULTS_MD"
fi
