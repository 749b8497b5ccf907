#!/usr/bin/env bash
# The incident sluice was built for (README, "Why it exists"), replayed through sluice and
# through HAProxy.
# Two backends behind one client connection; after 10 s backend 2 fails; the client sends 200
# calls/s with a 1 s deadline. How it fails (--failure, default slow):
#   slow       +500 ms a call, 16 workers, and work that outlives its caller (the incident)
#   fail-fast  every call answered UNAVAILABLE at once (a broken dependency)
#   hang       the process stops: connections frozen, PINGs unanswered, TCP still accepted
#   overload   4 workers of 51 ms a call: about 78 calls/s, below its half of the 200
# Reports per proxy: each backend's share before and after the failure, latency and errors after
# it, and how many calls the failing backend started after their deadline had passed. Writes one
# table per failure to loadtest/RESULTS.md.
#
# overload-all is the whole service overloaded instead of one backend failing: three backends
# with a few workers each (25 ms a call), offered 2x or 4x what they can do, open loop, 1 s
# deadlines, one client connection; backends that do every call they queued, whoever still
# waits. Through sluice with its default config, sluice with `adaptive_concurrency: off`,
# HAProxy and NGINX, it reports goodput (OK within the deadline, as a share of capacity) and
# the work the backends started after its caller's deadline, in five scenarios (see
# loadtest/overload_table.py).
#
#   loadtest/incident.sh                          # slow, about 70 s
#   loadtest/incident.sh --failure hang           # one variant
#   loadtest/incident.sh --failure overload-all   # about 4 minutes
#   loadtest/incident.sh --failure all            # all five, about 9 minutes
#   SMOKE=1 loadtest/incident.sh --failure all    # seconds each, sluice only, asserts loosely (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

SMOKE=${SMOKE:-0}
FAILURES=slow
while [ $# -gt 0 ]; do
  case "$1" in
    --failure) FAILURES=${2:?--failure needs slow, fail-fast, hang, overload, overload-all or all}; shift 2 ;;
    --failure=*) FAILURES=${1#--failure=}; shift ;;
    *) echo "usage: $0 [--failure slow|fail-fast|hang|overload|overload-all|all]" >&2; exit 2 ;;
  esac
done
[ "$FAILURES" = all ] && FAILURES="slow fail-fast hang overload overload-all"
FAILURES=${FAILURES//,/ }
for failure in $FAILURES; do
  case "$failure" in
    slow|fail-fast|hang|overload|overload-all) ;;
    *) echo "unknown failure '$failure': slow, fail-fast, hang, overload, overload-all or all" >&2; exit 2 ;;
  esac
done
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
B3=127.0.0.1:${B3_PORT:-21093}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

# sluice with its default config (p2c_ewma); HAProxy as a user would set it up for gRPC: round
# robin, with its (TCP) health checks every second.
export SLUICE_BALANCER=p2c_ewma
export HAPROXY_SERVER_OPTS="check inter 1s"
SMOKE_FAILED=0

# overload-all: every scenario through every target, one table.
overload_all() {
  local reports=$WORK/reports-overload-all.jsonl targets scenarios run scenario args target report
  if [ "$SMOKE" = 1 ]; then
    targets=${OVERLOAD_TARGETS:-sluice-default}
    scenarios=("2x|--load 2 --duration 4s --warmup 1500ms --relief 2s")
  else
    targets=${OVERLOAD_TARGETS:-"sluice-default sluice-adaptive-off $(command -v haproxy >/dev/null && echo haproxy || true) $(command -v nginx >/dev/null && echo nginx || true)"}
    scenarios=("2x|--load 2 --relief 3s" "4x|--load 4" "unequal|--load 2 --workers 1,2,4"
      "context|--load 2 --checks-context" "heavy-client|--load 2 --light-clients 3")
  fi
  export BACKEND3=$B3
  for run in "${scenarios[@]}"; do
    scenario=${run%%|*}; args=${run#*|}
    for target in $targets; do
      start_proxy "$target" || { SMOKE_FAILED=1; continue; }
      log "overload replay through $target: $scenario"
      # shellcheck disable=SC2086
      if ! report=$(timeout 120 "$LOADTEST" overload --target "127.0.0.1:$PROXY_PORT" \
        --backend-ports "${BACKEND1##*:},${BACKEND2##*:},${BACKEND3##*:}" $args --json); then
        log "the $scenario replay through $target failed; see $WORK/proxy.log"
        SMOKE_FAILED=1; stop_proxy; continue
      fi
      echo "{\"name\":\"$target\",\"scenario\":\"$scenario\",\"report\":$report}" >>"$reports"
      stop_proxy
    done
  done
  unset BACKEND3
  python3 loadtest/overload_table.py "$reports" "$SMOKE" >"$WORK/table-overload-all.md" || SMOKE_FAILED=1
  echo "failure: overload-all"
  cat "$WORK/table-overload-all.md"
  [ "$SMOKE" = 1 ] && return 0
  {
    echo "### The latest overload-all run"
    echo
    echo "\`loadtest/incident.sh --failure overload-all\` on $(machine_line), commit"
    echo "$(git rev-parse --short HEAD 2>/dev/null || echo unknown). Calls offered open loop with a 1 s deadline on one client"
    echo "connection (one per client in heavy-client), 8 s; goodput counts the calls sent after the first"
    echo "2 s that were answered OK. Backends do every call they queued, even after its caller has gone,"
    echo "except in \"context\". sluice-default is sluice with no keys but its listener and backends;"
    echo "sluice-adaptive-off adds \`adaptive_concurrency: off\`; HAProxy and NGINX are set up as in the"
    echo "other tables (round robin, no per-server limit)."
    echo
    cat "$WORK/table-overload-all.md"
  } >"$WORK/section-overload-all.md"
  write_section "overload-all" "$WORK/section-overload-all.md"
  log "wrote $RESULTS_MD"
}

for failure in $FAILURES; do
  if [ "$failure" = overload-all ]; then
    overload_all
    continue
  fi
  REPORTS=$WORK/reports-$failure.jsonl
  for target in $TARGETS; do
    start_proxy "$target"
    log "incident replay through $target, failure: $failure"
    # shellcheck disable=SC2086
    if ! report=$(timeout 120 "$LOADTEST" incident --target "127.0.0.1:$PROXY_PORT" \
      --backend-ports "${BACKEND1##*:},${BACKEND2##*:}" $ARGS --failure "$failure" --json); then
      # One failed run loses its row, not the other variants' tables.
      log "the $failure replay through $target failed; see $WORK/proxy.log"
      SMOKE_FAILED=1; stop_proxy; continue
    fi
    echo "{\"name\":\"$target\",\"report\":$report}" >>"$REPORTS"
    stop_proxy
  done
  python3 loadtest/incident_table.py "$REPORTS" "$SMOKE" >"$WORK/table-$failure.md" || SMOKE_FAILED=1
  echo "failure: $failure"
  cat "$WORK/table-$failure.md"
  if [ "$SMOKE" != 1 ]; then
    {
      echo "### Incident replay: $failure"
      echo
      echo "\`loadtest/incident.sh --failure $failure\` on $(machine_line): $ARGS, 1 s deadline,"
      echo "one client connection. $(python3 loadtest/incident_table.py --describe "$failure")"
      echo "Shares count the calls each backend received; latency and errors are the client's, for"
      echo "calls sent after the failure began. sluice runs its default config (p2c_ewma, outlier"
      echo "detection); HAProxy round robin with TCP health checks every second."
      echo
      cat "$WORK/table-$failure.md"
    } >"$WORK/section-$failure.md"
    write_section "incident-$failure" "$WORK/section-$failure.md"
    log "wrote $RESULTS_MD"
  fi
done
[ "$SMOKE_FAILED" = 0 ] || exit 3
