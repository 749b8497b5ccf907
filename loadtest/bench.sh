#!/usr/bin/env bash
# The benchmark: the same gRPC load sent direct, through sluice, and through HAProxy and NGINX
# when they are installed (Debian packages haproxy, nginx), interleaved over ROUNDS rounds.
# Records calls/s, latency (and what each proxy adds over direct), proxy CPU per call from
# /proc/PID/stat and peak RSS, and writes the tables to loadtest/RESULTS.md.
#
#   loadtest/bench.sh                      # full run (ROUNDS=3), about 10 minutes
#   ROUNDS=1 SCALE=0.2 loadtest/bench.sh   # quicker
#   SMOKE=1 loadtest/bench.sh              # seconds: sluice and direct, tiny counts, no RESULTS.md
#   SCENARIOS="small-c1 stream100" TARGETS="sluice haproxy" loadtest/bench.sh
#   SCENARIOS="tls-small-c16 tls-churn" loadtest/bench.sh   # TLS on the client leg, sluice and
#                                          # HAProxy only; written to its own section, bench-tls
#   PROFILE=release loadtest/bench.sh      # measure a `cargo build --release` binary instead
#   SCENARIOS="h2load-small-c1 h2load-small-c16 h2load-stream100" loadtest/bench.sh
#                                          # the small-call scenarios driven by h2load (Debian
#                                          # package nghttp2-client) instead of the tonic client
#   BIN_DIR=/tmp/old loadtest/bench.sh     # binaries already built (sluice, sluice-loadtest)
#
# sluice is built with the `dist` profile by default: the binary scripts/release and the container
# image ship (fat LTO, one codegen unit), measured against the Debian builds of HAProxy and NGINX.
#
# TLS scenarios (tls-*): the proxy terminates TLS 1.3 with a certificate made here by openssl
# (ECDSA P-256); tls-churn opens a new connection, so a new handshake, every 10 calls.
#
# The proxy is pinned to core 1, the client and backends to core 0. Everything listens on
# 127.0.0.1; every process is started and stopped by PID; every run is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/lib.sh

ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-1}
SMOKE=${SMOKE:-0}
DEFAULT_SCENARIOS="small-c1 small-c16 stream100 large-64k rate2k idle10k"
# The same small calls framed by another client, so no result rests on one client's framing.
command -v h2load >/dev/null && DEFAULT_SCENARIOS="$DEFAULT_SCENARIOS h2load-small-c1 h2load-small-c16 h2load-stream100"
SCENARIOS=${SCENARIOS:-$DEFAULT_SCENARIOS}
RESULTS_MD=${RESULTS_MD:-$ROOT/loadtest/RESULTS.md}
if [ "$SMOKE" = 1 ]; then
  SMOKE_DEFAULT="small-c16 stream100 tls-churn"
  command -v h2load >/dev/null && SMOKE_DEFAULT="$SMOKE_DEFAULT h2load-small-c16"
  ROUNDS=1; SCALE=0.02; SCENARIOS=${SMOKE_SCENARIOS:-$SMOKE_DEFAULT}; TARGETS=${TARGETS:-"direct sluice"}
  PROFILE=${PROFILE:-release}  # a smoke run checks the script, not the numbers: skip the LTO build
fi
PROFILE=${PROFILE:-dist}
find_binaries
if [ -z "${TARGETS:-}" ]; then
  TARGETS="direct sluice"
  command -v haproxy >/dev/null && TARGETS="$TARGETS haproxy"
  command -v nginx >/dev/null && TARGETS="$TARGETS nginx"
fi

if [ "$(nproc)" -ge 2 ]; then PIN_LOAD="taskset -c 0"; PIN_PROXY="taskset -c 1"; else PIN_LOAD=""; PIN_PROXY=""; fi
WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)
PROXY_PORT=${PROXY_PORT:-21080}
BACKEND1=127.0.0.1:${B1_PORT:-21081}
BACKEND2=127.0.0.1:${B2_PORT:-21082}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'cleanup; exit 130' INT TERM

n() { python3 -c "print(max(1, int($1 * $SCALE)))"; }
scenario_args() {  # the load of each scenario; calls scale with SCALE
  case "$1" in
    small-c1)  echo "--connections 1 --streams 16 --payload 100 --calls $(n 40000)" ;;
    small-c16) echo "--connections 16 --streams 16 --payload 100 --calls $(n 60000)" ;;
    stream100) echo "--connections 1 --streams 100 --payload 100 --calls $(n 40000)" ;;
    large-64k) echo "--connections 1 --streams 16 --payload 65536 --calls $(n 8000)" ;;
    rate2k)    echo "--connections 4 --rate 2000 --payload 100 --calls $(n 20000)" ;;
    idle10k)   echo "--connections 40 --streams 250 --kind hold --duration 5s --calls 10000" ;;
    tls-small-c16) echo "--connections 16 --streams 16 --payload 100 --calls $(n 60000) $TLS_ARGS" ;;
    tls-churn) echo "--connections 4 --streams 1 --payload 100 --calls $(n 20000) --calls-per-connection 10 $TLS_ARGS" ;;
    *) log "unknown scenario $1"; exit 2 ;;
  esac
}
# h2load's shape for the h2load-* scenarios: connections, streams per connection, calls.
h2load_args() {
  case "$1" in
    h2load-small-c1)  echo "-c 1 -m 16 -n $(n 40000)" ;;
    h2load-small-c16) echo "-c 16 -m 16 -n $(n 60000)" ;;
    h2load-stream100) echo "-c 1 -m 100 -n $(n 40000)" ;;
    *) log "unknown scenario $1"; exit 2 ;;
  esac
}
# One unary echo call's body for h2load: EchoRequest { message: "bench", payload: 100 bytes }
# in a gRPC frame (h2load sends the same bytes on every call).
h2load_body() {
  python3 - "$1" <<'PY'
import sys
msg = b"\x0a\x05bench" + b"\x12\x64" + b"x" * 100
open(sys.argv[1], "wb").write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
PY
}
# Runs h2load against $1 (host:port) for scenario $2, and prints a report in the tonic client's
# JSON shape. h2load sees HTTP statuses, not gRPC ones, and measures no percentiles: its rows
# have no latency, and its errors are failed or non-2xx requests.
run_h2load() {
  local out; out=$WORK/h2load.log
  # shellcheck disable=SC2046
  timeout 300 $PIN_LOAD h2load -t 1 $(h2load_args "$2") -d "$WORK/h2load-body.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$1/echo.v1.Echo/Unary" >"$out" 2>&1 || { tail -5 "$out" >&2; return 1; }
  python3 - "$out" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
status = re.search(r"status codes: (\d+) 2xx", text)
if not (done and rate and status):
    sys.exit("h2load output not understood")
total, finished, ok2xx = int(done.group(1)), int(done.group(2)), int(status.group(1))
print(json.dumps({"calls": finished, "calls_per_second": float(rate.group(1)),
                  "p50_ms": None, "p99_ms": None, "errors": total - ok2xx, "backends": {}}))
PY
}
target_addr() {
  if [ "$1" = direct ]; then echo "$BACKEND1,$BACKEND2"; else echo "127.0.0.1:$PROXY_PORT"; fi
}

# Certificates for the TLS scenarios: a CA, and a server certificate for localhost.
TLS_ARGS=""
case " $SCENARIOS " in *" tls-"*)
  make_test_certificates "$WORK/tls"
  TLS_ARGS="--tls-ca $WORK/tls/ca.pem --tls-name localhost" ;;
esac

$PIN_LOAD "$LOADTEST" backend --port "${BACKEND1##*:}" --id b1 >>"$WORK/backends.log" 2>&1 &
STARTED_PIDS+=($!)
$PIN_LOAD "$LOADTEST" backend --port "${BACKEND2##*:}" --id b2 >>"$WORK/backends.log" 2>&1 &
STARTED_PIDS+=($!)
wait_port "${BACKEND1##*:}"; wait_port "${BACKEND2##*:}"

case " $SCENARIOS " in *" h2load-"*)
  command -v h2load >/dev/null || { log "h2load missing: apt-get install nghttp2-client"; exit 2; }
  h2load_body "$WORK/h2load-body.bin" ;;
esac

RUNS=$WORK/runs.jsonl
TICK=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for target in $TARGETS; do
      case "$scenario" in
        tls-*) PROXY_TLS=1; case "$target" in sluice|haproxy) ;; *) continue ;; esac ;;
        *) PROXY_TLS=0 ;;
      esac
      start_proxy "$target"
      [ -n "$PROXY_PID" ] && before=$(cpu_ticks "$PROXY_PID") || before=0
      log "round $round  $scenario  $target"
      case "$scenario" in
        # h2load takes one address: direct is the first backend.
        h2load-*) load() { run_h2load "$(target_addr "$target" | cut -d, -f1)" "$scenario" 2>>"$WORK/load.log"; } ;;
        # shellcheck disable=SC2046
        *) load() { timeout 300 $PIN_LOAD "$LOADTEST" run --target "$(target_addr "$target")" \
                      $(scenario_args "$scenario") --json 2>>"$WORK/load.log"; } ;;
      esac
      if ! report=$(load); then
        log "load failed for $target $scenario:"; tail -5 "$WORK/load.log" >&2; tail -5 "$WORK/proxy.log" >&2 || true
        exit 1
      fi
      cpu_us=null; rss=null
      if [ -n "$PROXY_PID" ]; then
        after=$(cpu_ticks "$PROXY_PID")
        cpu_us=$(( (after - before) * 1000000 / TICK ))
        rss=$(peak_rss_kib "$PROXY_PID")
      fi
      stop_proxy
      echo "{\"round\":$round,\"scenario\":\"$scenario\",\"target\":\"$target\",\"cpu_us\":$cpu_us,\"rss_kib\":$rss,\"report\":$report}" >>"$RUNS"
    done
  done
done

SUMMARY=$WORK/summary.md
python3 - "$RUNS" "$SMOKE" >"$SUMMARY" <<'PY'
import json, sys, statistics
runs = [json.loads(l) for l in open(sys.argv[1])]
smoke = sys.argv[2] == "1"
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
by = {}
for r in runs:
    by.setdefault((r["scenario"], r["target"]), []).append(r)
scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
targets = list(dict.fromkeys(r["target"] for r in runs))
bad = [r for r in runs if r["report"]["errors"] > 0]
print("| scenario | target | calls/s | p50 ms | p99 ms | +p50 ms | +p99 ms | proxy µs/call | / HAProxy | peak RSS MiB | b1 share | errors |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for s in scenarios:
    row = {}
    for t in targets:
        rs = by.get((s, t), [])
        if not rs: continue
        calls = med([r["report"]["calls"] for r in rs])
        row[t] = dict(
            rps=med([r["report"]["calls_per_second"] for r in rs]),
            p50=med([r["report"]["p50_ms"] for r in rs]),
            p99=med([r["report"]["p99_ms"] for r in rs]),
            cpu=med([r["cpu_us"] / r["report"]["calls"] if r["cpu_us"] is not None and r["report"]["calls"] else None for r in rs]),
            rss=med([r["rss_kib"] / 1024 if r["rss_kib"] else None for r in rs]),
            share=med([r["report"]["backends"].get("b1", 0) / max(1, sum(r["report"]["backends"].values())) if r["report"]["backends"] else None for r in rs]),
            errors=sum(r["report"]["errors"] for r in rs),
        )
    d = row.get("direct"); h = row.get("haproxy")
    for t, v in row.items():
        f = lambda x, p=2: "–" if x is None else f"{x:,.{p}f}"
        add50 = None if d is None or t == "direct" or v["p50"] is None else v["p50"] - d["p50"]
        add99 = None if d is None or t == "direct" or v["p99"] is None else v["p99"] - d["p99"]
        ratio = None if h is None or v["cpu"] is None or h["cpu"] is None else v["cpu"] / h["cpu"]
        print(f"| {s} | {t} | {f(v['rps'],0)} | {f(v['p50'],3)} | {f(v['p99'],3)} | {f(add50,3)} | {f(add99,3)} | {f(v['cpu'],1)} | {f(ratio)} | {f(v['rss'],1)} | {f(v['share'])} | {v['errors']} |")
if bad:
    print(f"\nERRORS in {len(bad)} runs", file=sys.stderr)
    sys.exit(3)
# Through a proxy, round robin over two backends: each must get about half.
lopsided = [r for r in runs if r["target"] != "direct" and r["scenario"] != "idle10k"
            and not r["scenario"].startswith("h2load-")
            and not 0.3 <= r["report"]["backends"].get("b1", 0) / max(1, sum(r["report"]["backends"].values())) <= 0.7]
if lopsided:
    print(f"\nLOPSIDED share in {len(lopsided)} runs", file=sys.stderr)
    sys.exit(3)
PY
cat "$SUMMARY"
case "$BIN_DIR" in
  *target/dist) BUILT_AS="the \`dist\` profile, as scripts/release and the image build it" ;;
  *target/release) BUILT_AS="the release profile" ;;
  *) BUILT_AS="prebuilt" ;;
esac
if [ "$SMOKE" != 1 ]; then
  {
    case "${RESULTS_SECTION:-bench}" in
      bench) echo "## Benchmark" ;;
      *) echo "## Benchmark: $SCENARIOS" ;;
    esac
    echo
    echo "\`ROUNDS=$ROUNDS SCALE=$SCALE SCENARIOS=\"$SCENARIOS\" loadtest/bench.sh\` on $(machine_line)."
    echo "sluice from \`${BIN_DIR#"$ROOT"/}\` ($BUILT_AS)."
    echo "Versions: $("$SLUICE" --version)$(command -v haproxy >/dev/null && echo ", $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3)")$(command -v nginx >/dev/null && echo ", $(nginx -v 2>&1 | cut -d' ' -f3)")."
    echo "Medians over rounds. The proxy is pinned to core 1, the client and backends to core 0; +p50/+p99"
    echo "are what the proxy adds over direct (direct spreads connections over both backends, so its"
    echo "1-connection scenarios use one backend). idle10k holds 10,000 silent server streams for 5 s;"
    echo "its column of interest is peak RSS. h2load-* rows are the small-call scenarios driven by h2load"
    echo "(direct: to one backend); h2load measures no percentiles, so those rows show none."
    echo
    cat "$SUMMARY"
  } >"$WORK/section.md"
  write_section "${RESULTS_SECTION:-bench}" "$WORK/section.md"
  log "wrote $RESULTS_MD"
fi
