#!/usr/bin/env bash
# The live-cluster benchmark (issue 18): `waypoint run --kube` against the in-test Kubernetes
# API server (discovery::testing) holding SERVICES Services x ENDPOINTS endpoints (one Pod
# each), ROUTES HTTPRoutes and POLICIES AuthorizationPolicies; then RATE endpoint changes per
# second, alone and for CHURN_SECS under c=CONNS keep-alive load. See
# benches/tools/src/bin/kube_churn.rs for every phase and what each figure measures.
#
#   SERVICES=10000 ENDPOINTS=5 ROUTES=1000 POLICIES=1000 RATE=100 CHURN_SECS=60 BASE_SECS=20
#   CONNS=16 WORKERS=1 PROXY_CPU=1 CLIENT_CPU=0 BUILD=1 OUT=target/bench/kube-<date>.json
#
# The waypoint runs on PROXY_CPU, the API server, backends and load generator (one process)
# on CLIENT_CPU, as benches/run.sh places them.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES="${SERVICES:-10000}" ENDPOINTS="${ENDPOINTS:-5}" ROUTES="${ROUTES:-1000}"
POLICIES="${POLICIES:-1000}" RATE="${RATE:-100}" CHURN_SECS="${CHURN_SECS:-60}"
BASE_SECS="${BASE_SECS:-20}" CONNS="${CONNS:-16}" WORKERS="${WORKERS:-1}"
PROXY_CPU="${PROXY_CPU:-1}" CLIENT_CPU="${CLIENT_CPU:-0}" BUILD="${BUILD:-1}"
mkdir -p target/bench
OUT="${OUT:-target/bench/kube-$(date -u +%Y%m%dT%H%M%SZ).json}"
if [[ "$BUILD" == 1 ]]; then
  cargo build --profile dist -p proxy --bin waypoint
  cargo build --release -p waypoint-bench-tools --bin kube-churn
fi
taskset -c "$CLIENT_CPU" target/release/kube-churn --waypoint target/dist/waypoint \
  --waypoint-cpus "$PROXY_CPU" --workers "$WORKERS" \
  --services "$SERVICES" --endpoints "$ENDPOINTS" --routes "$ROUTES" --policies "$POLICIES" \
  --rate "$RATE" --churn-secs "$CHURN_SECS" --base-secs "$BASE_SECS" --conns "$CONNS" \
  --json "$OUT"
echo "wrote $OUT" >&2
