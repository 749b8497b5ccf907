# Shared by loadtest/bench.sh, incident.sh and soak.sh: process control by PID, proxy configs,
# and writing a section of loadtest/RESULTS.md. Everything listens on 127.0.0.1 only.

STARTED_PIDS=()
# Room for 10,000 streams' worth of connections (NGINX opens one upstream per stream).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

find_binaries() {  # sets SLUICE and LOADTEST: those in $BIN_DIR, else fresh builds of $PROFILE
  if [ -z "${BIN_DIR:-}" ]; then
    local profile=${PROFILE:-release}
    cargo build --profile "$profile" -q -p sluice -p sluice-loadtest
    BIN_DIR=$ROOT/target/$profile
  fi
  SLUICE=$BIN_DIR/sluice
  LOADTEST=$BIN_DIR/sluice-loadtest
}

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

stop_pid() {  # stop_pid PID: TERM, up to 5 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local i
  for (( i=${#STARTED_PIDS[@]}-1; i>=0; i-- )); do stop_pid "${STARTED_PIDS[$i]}"; done
  STARTED_PIDS=()
}

wait_port() {  # wait_port PORT: until something accepts on 127.0.0.1:PORT, at most 10 s
  local i
  for i in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  log "nothing listens on 127.0.0.1:$1 after 10 s"
  return 1
}

tree() {  # tree PID: the PID and all its descendants (NGINX works in a child process)
  local pid=$1 child
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do tree "$child"; done
}

cpu_ticks() {  # cpu_ticks PID: utime + stime over the process tree, in clock ticks
  local total=0 pid
  for pid in $(tree "$1"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

peak_rss_kib() {  # peak_rss_kib PID: VmHWM summed over the process tree
  local total=0 pid
  for pid in $(tree "$1"); do
    total=$((total + $(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# Ports default below 32768, outside Linux's ephemeral range, so a client connection cannot hold
# them. Proxy configs: listener 127.0.0.1:$PROXY_PORT, backends $BACKEND1 and $BACKEND2, one worker
# thread each (the proxy gets one pinned core), round robin per request.
write_sluice_conf() {  # write_sluice_conf FILE [BALANCER]; TLS on the listener when PROXY_TLS=1
  local tls=""
  [ "${PROXY_TLS:-0}" = 1 ] && tls="    tls: { cert_file: \"$WORK/tls/server.pem\", key_file: \"$WORK/tls/server.key\" }"
  cat >"$1" <<CONF
listeners:
  - name: grpc
    address: "127.0.0.1:$PROXY_PORT"
$tls
threads: 1
upgrade_sock: "$WORK/sluice_upgrade.sock"
log:
  level: warn
clusters:
  - name: bench
    balancer: ${2:-round_robin}
    # HAProxy and NGINX run without a per-server cap; idle10k holds 5,000 calls per backend.
    max_concurrent_streams_per_backend: 20000
    discovery:
      static: ["$BACKEND1", "$BACKEND2"]
CONF
}

# The config a new user starts from: one listener, one cluster, every other key at its default
# (p2c_ewma, adaptive concurrency on, threads one per core); EXTRA adds keys to the cluster.
# Backends $BACKEND1, $BACKEND2 and, if set, $BACKEND3.
write_sluice_default_conf() {  # write_sluice_default_conf FILE [EXTRA]
  cat >"$1" <<CONF
listeners:
  - name: grpc
    address: "127.0.0.1:$PROXY_PORT"
upgrade_sock: "$WORK/sluice_upgrade.sock"
log:
  level: warn
clusters:
  - name: service
    discovery:
      static: ["$BACKEND1", "$BACKEND2"${BACKEND3:+, \"$BACKEND3\"}]
${2:-}
CONF
}

write_haproxy_conf() {  # write_haproxy_conf FILE
  cat >"$1" <<CONF
global
  nbthread 1
  maxconn 9000
  tune.h2.initial-window-size 1048576
  tune.h2.max-concurrent-streams 256
  tune.bufsize 65536
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-request 30s
frontend fe
  bind 127.0.0.1:$PROXY_PORT $( [ "${PROXY_TLS:-0}" = 1 ] && echo "ssl crt $WORK/tls/server-combined.pem alpn h2" || echo "proto h2" )
  default_backend be
backend be
  balance roundrobin
  http-reuse always
  server b1 $BACKEND1 proto h2 ${HAPROXY_SERVER_OPTS:-}
  server b2 $BACKEND2 proto h2 ${HAPROXY_SERVER_OPTS:-}
$( [ -n "${BACKEND3:-}" ] && echo "  server b3 $BACKEND3 proto h2 ${HAPROXY_SERVER_OPTS:-}" )
CONF
}

write_nginx_conf() {  # write_nginx_conf DIR
  mkdir -p "$1/tmp"
  cat >"$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;

events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
  upstream backends {
    server $BACKEND1;
    server $BACKEND2;
    $( [ -n "${BACKEND3:-}" ] && echo "server $BACKEND3;" )
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$PROXY_PORT http2;
    http2_max_concurrent_streams 256;
    http2_body_preread_size 1m;
    keepalive_requests 1000000;
    client_max_body_size 16m;
    location / {
      grpc_pass grpc://backends;
      grpc_buffer_size 128k;
      grpc_read_timeout 60s;
    }
  }
}
CONF
}

make_test_certificates() {  # make_test_certificates DIR: ca.pem, server.pem/.key (localhost), server-combined.pem
  local dir=$1
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
  cat "$dir/server.pem" "$dir/server.key" >"$dir/server-combined.pem"
}

start_proxy() {  # start_proxy TARGET: sets PROXY_PID (empty for direct)
  local target=$1
  PROXY_PID=""
  case "$target" in
    direct) return 0 ;;
    sluice)
      write_sluice_conf "$WORK/sluice.yaml" "${SLUICE_BALANCER:-round_robin}"
      $PIN_PROXY "$SLUICE" run --config "$WORK/sluice.yaml" >>"$WORK/proxy.log" 2>&1 &
      ;;
    sluice-default|sluice-adaptive-off)
      local extra=""
      [ "$target" = sluice-adaptive-off ] && extra="    adaptive_concurrency: off"
      write_sluice_default_conf "$WORK/sluice.yaml" "$extra"
      $PIN_PROXY "$SLUICE" run --config "$WORK/sluice.yaml" >>"$WORK/proxy.log" 2>&1 &
      ;;
    haproxy)
      write_haproxy_conf "$WORK/haproxy.cfg"
      $PIN_PROXY haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/proxy.log" 2>&1 &
      ;;
    nginx)
      write_nginx_conf "$WORK/nginx"
      $PIN_PROXY nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >>"$WORK/proxy.log" 2>&1 &
      ;;
    *) log "unknown target $target"; return 2 ;;
  esac
  PROXY_PID=$!
  STARTED_PIDS+=("$PROXY_PID")
  wait_port "$PROXY_PORT" || { tail -20 "$WORK/proxy.log" >&2; return 1; }
}

stop_proxy() {
  [ -n "${PROXY_PID:-}" ] && stop_pid "$PROXY_PID"
  PROXY_PID=""
}

# write_section NAME FILE: replaces the part of loadtest/RESULTS.md between
# <!-- NAME:start --> and <!-- NAME:end --> with FILE's contents (appends it if missing).
write_section() {
  python3 - "$1" "$2" "$RESULTS_MD" <<'PY'
import sys, pathlib
name, body_file, results = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
body = pathlib.Path(body_file).read_text().rstrip() + "\n"
start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
text = results.read_text() if results.exists() else "# sluice load test results\n"
block = f"{start}\n{body}{end}"
if start in text and end in text:
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    text = before + block + after
else:
    text = text.rstrip() + "\n\n" + block + "\n"
results.write_text(text)
PY
}

machine_line() {
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d)"
}
