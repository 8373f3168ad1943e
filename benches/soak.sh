#!/usr/bin/env bash
# Soak: steady HBONE load through the waypoint for SOAK_MINUTES (default 3, max 60), with
# periodic abuse every ABUSE_EVERY seconds (default 20): 200 stalled TCP connections held
# without a TLS handshake, a burst of 2,000 short-lived tunnels (new tunnel per request), and
# 500 idle tunnels held for a few seconds. Samples the waypoint's RSS and open file descriptors
# every second into target/soak/<time>/samples.csv and draws chart.svg; the summary compares the
# first and last minute (flat lines = nothing accumulates). Loopback only; bounded in time and
# count; stops only what it started, by PID.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MIN="${SOAK_MINUTES:-3}"; (( MIN >= 1 && MIN <= 60 )) || { echo "SOAK_MINUTES must be 1..60"; exit 2; }
EVERY="${ABUSE_EVERY:-20}"
OUT="$ROOT/target/soak/$(date -u +%Y%m%dT%H%M%SZ)"; mkdir -p "$OUT"
BIN="$ROOT/target/release"
(cd "$ROOT" && cargo build --profile dist -q -p proxy --bin waypoint && cargo build --release -q -p waypoint-bench-tools --bin loadgen --bin bench-backend)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$ROOT/target/dist/waypoint" certs --out "$OUT/pki" >/dev/null
sed -e 's/127.0.0.11"\]/127.0.0.1"]/; s/127.0.0.12"\]/127.0.0.1"]/; s/127.0.0.13"\]/127.0.0.1"]/' \
  "$ROOT/examples/bookinfo.yaml" >"$OUT/config.yaml"
# Backends on 127.0.0.1:29181-29183 (bookinfo's targetPort 9080 rewritten per slice).
python3 - "$OUT/config.yaml" <<'PY'
import sys, re
p = sys.argv[1]; s = open(p).read()
ports = iter([29181, 29182, 29181, 29183])
s = re.sub(r"ports: \[\{name: http, port: 9080, protocol: TCP\}\]", lambda m: f"ports: [{{name: http, port: {next(ports)}, protocol: TCP}}]", s)
open(p, "w").write(s)
PY
"$BIN/bench-backend" --threads 1 --listen "reviews-v1=127.0.0.1:29181" --listen "reviews-v2=127.0.0.1:29182" \
  --listen "ratings=127.0.0.1:29183" 2>"$OUT/backend.log" & PIDS+=($!)
"$ROOT/target/dist/waypoint" run --config "$OUT/config.yaml" --certs "$OUT/pki" --hbone-addr 127.0.0.1:25208 \
  --ready-addr 127.0.0.1:25221 --metrics-addr 127.0.0.1:25220 --admin-addr 127.0.0.1:25200 --workers 1 \
  >"$OUT/access.log" 2>"$OUT/waypoint.log" & WP=$!; PIDS+=("$WP")
for _ in $(seq 1 100); do curl -sf -o /dev/null http://127.0.0.1:25221/healthz/ready && break; sleep 0.1; done

LG=("$BIN/loadgen" --mode hbone --target 127.0.0.1:25208 --certs "$OUT/pki" --warmup 0s)
"${LG[@]}" --concurrency 8 --rate 500 --duration "$((MIN * 60))s" --max-requests 100000000 \
  >"$OUT/steady.json" 2>"$OUT/steady.log" & PIDS+=($!)

echo "t_s,rss_kib,fds,phase" >"$OUT/samples.csv"
start=$(date +%s); next_abuse=$((start + EVERY)); end=$((start + MIN * 60))
while (( $(date +%s) < end )); do
  now=$(date +%s); phase=steady
  if (( now >= next_abuse )); then
    phase=abuse; next_abuse=$((now + EVERY))
    ( # stalled handshakes: TCP connects that never speak TLS, held 3 s
      fds=(); for _ in $(seq 1 200); do exec {fd}<>/dev/tcp/127.0.0.1/25208 && fds+=("$fd"); done
      sleep 3; for fd in "${fds[@]}"; do exec {fd}<&-; done ) &
    "${LG[@]}" --concurrency 16 --new-tunnel-per-request --duration 3s --max-requests 2000 >/dev/null 2>&1 &
    "${LG[@]}" --idle-tunnels 500 --hold 3s --duration 20s >/dev/null 2>&1 &
  fi
  rss=$(awk '/VmRSS/{print $2}' "/proc/$WP/status"); fds=$(ls "/proc/$WP/fd" | wc -l)
  echo "$((now - start)),$rss,$fds,$phase" >>"$OUT/samples.csv"
  sleep 1
done
wait "${PIDS[2]}" 2>/dev/null || true

python3 - "$OUT" <<'PY'
import csv, sys, statistics as st
out = sys.argv[1]
rows = [r for r in csv.DictReader(open(f"{out}/samples.csv"))]
t = [int(r["t_s"]) for r in rows]; rss = [int(r["rss_kib"]) / 1024 for r in rows]; fds = [int(r["fds"]) for r in rows]
first = [i for i, x in enumerate(t) if x < 60]; last = [i for i, x in enumerate(t) if x >= t[-1] - 60]
def m(v, idx): return st.median([v[i] for i in idx]) if idx else float("nan")
summary = (f"soak {t[-1]} s: RSS MiB median first minute {m(rss, first):.1f}, last minute {m(rss, last):.1f}, max {max(rss):.1f}; "
           f"fds median first {m(fds, first):.0f}, last {m(fds, last):.0f}, max {max(fds)}")
open(f"{out}/summary.txt", "w").write(summary + "\n"); print(summary)
W, H, P = 800, 300, 40
def poly(vals, top, color):
    pts = " ".join(f"{P + (W - 2 * P) * x / max(t[-1], 1):.1f},{H - P - (H - 2 * P) * v / top:.1f}" for x, v in zip(t, vals))
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>'
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>', poly(rss, max(rss) * 1.2, "#1f77b4"), poly(fds, max(fds) * 1.2, "#d62728"),
       f'<text x="{P}" y="20">waypoint soak: RSS MiB (blue, max {max(rss):.1f}), open fds (red, max {max(fds)}); abuse every {sys.argv[1] and ""}{len([r for r in rows if r["phase"] == "abuse"])} bursts</text>',
       f'<text x="{P}" y="{H - 10}">time (s), 0..{t[-1]}</text>', "</svg>"]
open(f"{out}/chart.svg", "w").write("\n".join(svg))
PY
echo "soak: $OUT (samples.csv, chart.svg, summary.txt)"
