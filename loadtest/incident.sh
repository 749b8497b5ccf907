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
#   loadtest/incident.sh                          # slow, about 70 s
#   loadtest/incident.sh --failure hang           # one variant
#   loadtest/incident.sh --failure all            # all four, about 5 minutes
#   SMOKE=1 loadtest/incident.sh --failure all    # seconds each, sluice only, asserts loosely (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

SMOKE=${SMOKE:-0}
FAILURES=slow
while [ $# -gt 0 ]; do
  case "$1" in
    --failure) FAILURES=${2:?--failure needs slow, fail-fast, hang, overload or all}; shift 2 ;;
    --failure=*) FAILURES=${1#--failure=}; shift ;;
    *) echo "usage: $0 [--failure slow|fail-fast|hang|overload|all]" >&2; exit 2 ;;
  esac
done
[ "$FAILURES" = all ] && FAILURES="slow fail-fast hang overload"
FAILURES=${FAILURES//,/ }
for failure in $FAILURES; do
  case "$failure" in
    slow|fail-fast|hang|overload) ;;
    *) echo "unknown failure '$failure': slow, fail-fast, hang, overload or all" >&2; exit 2 ;;
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
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

# sluice with its default config (p2c_ewma); HAProxy as a user would set it up for gRPC: round
# robin, with its (TCP) health checks every second.
export SLUICE_BALANCER=p2c_ewma
export HAPROXY_SERVER_OPTS="check inter 1s"
SMOKE_FAILED=0
for failure in $FAILURES; do
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
