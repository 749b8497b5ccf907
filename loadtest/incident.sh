#!/usr/bin/env bash
# The incident sluice was built for (README, "Why it exists"), replayed through sluice and
# through HAProxy.
# Two backends behind one client connection; after 10 s backend 2 turns slow (+500 ms a call)
# with a small worker pool and leaking calls; the client sends 200 calls/s with a 1 s deadline.
# Reports per proxy: each backend's share before and after the slowdown, latency and errors after
# it, and how many calls the slow backend started after their deadline had passed. Writes the
# table to loadtest/RESULTS.md.
#
#   loadtest/incident.sh            # about 70 s
#   SMOKE=1 loadtest/incident.sh    # seconds, sluice only, asserts the targets loosely (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

SMOKE=${SMOKE:-0}
RESULTS_MD=${RESULTS_MD:-$ROOT/loadtest/RESULTS.md}
find_binaries
if [ "$SMOKE" = 1 ]; then
  TARGETS=${TARGETS:-sluice}; ARGS="--slow-after 2s --duration 6s --rate 100"
else
  TARGETS=${TARGETS:-"sluice $(command -v haproxy >/dev/null && echo haproxy || true)"}; ARGS="--slow-after 10s --duration 30s --rate 200"
fi
PIN_PROXY=""
WORK=$(mktemp -d /tmp/sluice-incident.XXXXXX)
PROXY_PORT=${PROXY_PORT:-21090}
BACKEND1=127.0.0.1:${B1_PORT:-21091}
BACKEND2=127.0.0.1:${B2_PORT:-21092}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

# sluice with its default balancer (p2c_ewma); HAProxy as a user would set it up for gRPC.
export SLUICE_BALANCER=p2c_ewma
REPORTS=$WORK/reports.jsonl
for target in $TARGETS; do
  start_proxy "$target"
  log "incident replay through $target"
  # shellcheck disable=SC2086
  report=$(timeout 120 "$LOADTEST" incident --target "127.0.0.1:$PROXY_PORT" \
    --backend-ports "${BACKEND1##*:},${BACKEND2##*:}" $ARGS --json)
  echo "{\"name\":\"$target\",\"report\":$report}" >>"$REPORTS"
  stop_proxy
done

python3 - "$REPORTS" "$SMOKE" >"$WORK/table.md" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
smoke = sys.argv[2] == "1"
print("| proxy | b1 / b2 share before | b1 / b2 share after | p50 after ms | p99 after ms | errors after | slow backend: calls started past deadline | slow backend: peak concurrency |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
failed = []
for line in lines:
    name, r = line["name"], line["report"]
    sb, sa, a = r["share_before"], r["share_after"], r["after"]
    errors = ", ".join(f"{k} {v}" for k, v in a["codes"].items() if k != "OK") or "0"
    print(f"| {name} | {sb['b1']:.0%} / {sb['b2']:.0%} | {sa['b1']:.0%} / {sa['b2']:.0%} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {errors} | {r['started_past_deadline']} | {r['slow_max_in_flight']} |")
    if smoke:
        if sa["b2"] > 0.2: failed.append(f"slow backend share after {sa['b2']:.0%}")
        if r["started_past_deadline"] != 0: failed.append("calls started past their deadline")
        if a["errors"] > a["calls"] * 0.05: failed.append(f"{a['errors']} errors")
if failed:
    print("SMOKE FAILED: " + "; ".join(failed), file=sys.stderr)
    sys.exit(3)
PY
cat "$WORK/table.md"
if [ "$SMOKE" != 1 ]; then
  {
    echo "## Incident replay"
    echo
    echo "\`loadtest/incident.sh\` on $(machine_line): $ARGS, 1 s deadline, one client connection."
    echo "Backend 2 turns slow (+500 ms a call, 16 workers, work that outlives its caller) after the"
    echo "first phase. Shares count the calls each backend received; latency and errors are the"
    echo "client's, for calls sent after the slowdown. sluice runs its default balancer (p2c_ewma),"
    echo "HAProxy round robin."
    echo
    cat "$WORK/table.md"
  } >"$WORK/section.md"
  write_section incident "$WORK/section.md"
  log "wrote $RESULTS_MD"
fi
