#!/usr/bin/env bash
# Run ../shared/envoy-reference/smoke.sh against THIS waypoint: the reference PKI, nginx
# backends and Envoy HBONE client, with our binary in the waypoint's place, configured by
# the directory examples/envoy-reference/ (services, routes and the AuthorizationPolicy).
# Everything on 127.0.0.1; stops only what it started, by PID.
#   WAYPOINT_BIN   binary to test (default: target/release/waypoint, built if missing)
#   REF            path of the reference folder (default: ../shared/envoy-reference)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REF="${REF:-$ROOT/../shared/envoy-reference}"
export RUN_DIR="${RUN_DIR:-/tmp/waypoint-smoke-run}"
export WAYPOINT_PORT="${WAYPOINT_PORT:-15108}"
BIN="${WAYPOINT_BIN:-$ROOT/target/release/waypoint}"
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --release -p proxy --bin waypoint)

mkdir -p "$RUN_DIR/wp-certs" "$RUN_DIR/logs"
"$REF/pki.sh" >/dev/null
PKI="$RUN_DIR/pki"
ln -sf "$PKI/waypoint-cert.pem" "$RUN_DIR/wp-certs/cert-chain.pem"
ln -sf "$PKI/waypoint-key.pem" "$RUN_DIR/wp-certs/key.pem"
ln -sf "$PKI/root-cert.pem" "$RUN_DIR/wp-certs/root-cert.pem"
"$REF/backends.sh" start >/dev/null

CONFIGS=(--config "$ROOT/examples/envoy-reference")
LOG="$RUN_DIR/logs/our-waypoint-access.log"
: >"$LOG"
"$BIN" run "${CONFIGS[@]}" --certs "$RUN_DIR/wp-certs" \
  --hbone-addr "127.0.0.1:$WAYPOINT_PORT" --ready-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --admin-addr 127.0.0.1:0 >"$LOG" 2>"$RUN_DIR/logs/our-waypoint.log" &
WP_PID=$!
cleanup() {
  kill "$WP_PID" 2>/dev/null || true
  wait "$WP_PID" 2>/dev/null || true
  "$REF/down.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT
WAYPOINT=none "$REF/up.sh" >/dev/null
WAYPOINT_ACCESS_LOG="$LOG" "$REF/smoke.sh"
