#!/usr/bin/env bash
# benches/alloc.sh: the waypoint's allocator (jemalloc with the options compiled into it,
# proxy/src/memory/mod.rs) against the alternatives: jemalloc with its default options,
# glibc's malloc and mimalloc. The same binary otherwise (proxy features: default `jemalloc`,
# or --no-default-features with `alloc-system` / `alloc-mimalloc`), the same scenarios
# through benches/run.sh, in one invocation with the variants' order rotated every repeat.
# This is how issue 17 chose jemalloc over the project's former page pool
# (docs/bench/2026-12-06-allocators.md).
#
# Measured per variant (benches/run.sh scenarios `c16` and `idle`, waypoint only):
#   c16:  req/s, p99, proxy CPU-s per 1k requests, peak RSS;
#   idle: IDLE_TUNNELS tunnels: bytes per tunnel just idle (0.5 s) and parked (after
#         IDLE_HOLD s), peak RSS while they were open, RSS 5 s after they all closed.
#
# Environment (all optional):
#   VARIANTS="jemalloc jemalloc-default system mimalloc"   REPEAT=2 (1..5)
#   DURATION=10   IDLE_TUNNELS=10000   IDLE_HOLD=10
#   PROFILE=dist  (release: a quicker, less faithful build)     BUILD=1 (0: reuse target/alloc/)
# Output: target/bench/alloc-<UTC timestamp>/{summary.md,summary.json,runs/}
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
clamp() { local v="$1" lo="$2" hi="$3"; [[ "$v" =~ ^[0-9]+$ ]] || v="$lo"; ((v < lo)) && v=$lo; ((v > hi)) && v=$hi; echo "$v"; }
VARIANTS="${VARIANTS:-jemalloc jemalloc-default system mimalloc}"
REPEAT="$(clamp "${REPEAT:-2}" 1 5)"
DURATION="$(clamp "${DURATION:-10}" 1 60)"
IDLE_TUNNELS="$(clamp "${IDLE_TUNNELS:-10000}" 1 100000)"
IDLE_HOLD="$(clamp "${IDLE_HOLD:-10}" 1 60)"
PROFILE="${PROFILE:-dist}"
BUILD="${BUILD:-1}"
[[ "$PROFILE" == dist || "$PROFILE" == release ]] || { echo "PROFILE must be dist or release" >&2; exit 2; }

OUT="$TARGET_DIR/bench/alloc-$(date -u +%Y%m%dT%H%M%SZ)"
BINS="$TARGET_DIR/alloc"
mkdir -p "$OUT/runs" "$BINS"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

feature_of() { # VARIANT -> cargo feature ('' = the default, jemalloc)
  case "$1" in
    jemalloc | jemalloc-default) echo "" ;;
    system) echo alloc-system ;;
    mimalloc) echo alloc-mimalloc ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
binary_of() { local f; f="$(feature_of "$1")"; echo "$BINS/waypoint-${f:-jemalloc}-$PROFILE"; }
env_of() { # VARIANT -> extra environment of the waypoint process
  case "$1" in
    # jemalloc's own defaults instead of the compiled-in options (the environment variable,
    # prefixed _RJEM_ by tikv-jemallocator, is read after them).
    jemalloc-default) echo "_RJEM_MALLOC_CONF=background_thread:false,dirty_decay_ms:10000,muzzy_decay_ms:10000" ;;
    *) echo "" ;;
  esac
}

for v in $VARIANTS; do feature_of "$v" >/dev/null; done
if [[ "$BUILD" == 1 ]]; then
  log "building the bench tools (release)"
  (cd "$ROOT" && cargo build --release --quiet -p waypoint-bench-tools --bins)
  # The default last, so target/$PROFILE/waypoint is the default binary again afterwards.
  for f in alloc-system alloc-mimalloc ""; do
    want=0
    for v in $VARIANTS; do [[ "$(feature_of "$v")" == "$f" ]] && want=1; done
    ((want)) || continue
    log "building waypoint (profile $PROFILE, allocator ${f:-jemalloc})"
    (cd "$ROOT" && cargo build --profile "$PROFILE" --quiet -p proxy --bin waypoint ${f:+--no-default-features --features "$f"})
    cp "$TARGET_DIR/$PROFILE/waypoint" "$BINS/waypoint-${f:-jemalloc}-$PROFILE"
  done
fi
for v in $VARIANTS; do
  [[ -x "$(binary_of "$v")" ]] || { echo "$(binary_of "$v") missing (run with BUILD=1)" >&2; exit 1; }
done

read -r -a LIST <<<"$VARIANTS"
n=${#LIST[@]}
for rep in $(seq 1 "$REPEAT"); do
  for ((i = 0; i < n; i++)); do
    v="${LIST[$(((i + rep - 1) % n))]}"
    log "rep $rep: $v"
    extra_env="$(env_of "$v")"
    env ${extra_env:+"$extra_env"} WP_BIN="$(binary_of "$v")" BUILD=0 UPDATE_README=0 TARGETS=waypoint \
      SCENARIOS="c16 idle" DURATION="$DURATION" IDLE_TUNNELS="$IDLE_TUNNELS" IDLE_HOLD="$IDLE_HOLD" \
      "$ROOT/benches/run.sh" >/dev/null 2>"$OUT/runs/$v-$rep.log" || { log "  run failed: $(tail -n 3 "$OUT/runs/$v-$rep.log")"; continue; }
    run="$(readlink -f "$TARGET_DIR/bench/latest")"
    cp "$run/results.json" "$OUT/runs/$v-$rep.json"
  done
done

GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
python3 - "$OUT" "$VARIANTS" "$REPEAT" "$PROFILE" "$GIT_REV" "$IDLE_TUNNELS" "$IDLE_HOLD" "$DURATION" <<'PY'
import json, os, statistics, sys, datetime
out, variants, repeat, profile, rev, tunnels, hold, duration = sys.argv[1:]
variants = variants.split()
def runs(v):
    for rep in range(1, int(repeat) + 1):
        p = os.path.join(out, "runs", f"{v}-{rep}.json")
        if os.path.exists(p):
            yield json.load(open(p))
def pick(doc, kind):
    if kind == "idle":
        for r in doc.get("idle_tunnels", []):
            if r["target"] == "waypoint":
                return r["result"]
    else:
        for r in doc.get("load", []):
            if r.get("scenario") == "c16" and r.get("target") == "waypoint":
                return r
    return None
def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None
rows, failures = [], []
for v in variants:
    docs = list(runs(v))
    loads = [pick(d, "load") for d in docs]
    idles = [pick(d, "idle") for d in docs]
    loads = [l for l in loads if l]; idles = [i for i in idles if i]
    errors = sum((l.get("errors") or 0) for l in loads) + sum((i.get("open_errors") or 0) for i in idles)
    if len(loads) < int(repeat) or len(idles) < int(repeat) or errors:
        failures.append(f"{v}: {len(loads)}/{repeat} load runs, {len(idles)}/{repeat} idle runs, {errors} errors")
    px = lambda i, k: (i.get("proxy") or {}).get(k)
    rows.append({
        "variant": v,
        "runs": len(docs),
        "c16_rps": med([l.get("rps") for l in loads]),
        "c16_p99_us": med([(l.get("latency_us") or {}).get("p99") for l in loads]),
        "c16_cpu_s_per_1k": med([l.get("proxy_cpu_s_per_1k") for l in loads]),
        "c16_peak_rss_kb": med([l.get("proxy_peak_rss_kb") for l in loads]),
        "idle_bytes_per_tunnel_early": med([px(i, "bytes_per_tunnel_early") for i in idles]),
        "idle_bytes_per_tunnel_parked": med([px(i, "bytes_per_tunnel") for i in idles]),
        "idle_peak_rss_kb": med([px(i, "peak_rss_kb") for i in idles]),
        "idle_settled_rss_kb": med([px(i, "rss_settled_kb") for i in idles]),
    })
base = next((r for r in rows if r["variant"] == variants[0]), None)
def fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"
def mib(kb):
    return "-" if kb is None else f"{kb / 1024:.1f}"
def vs(r, k):
    if not base or base is r or r[k] is None or not base[k]:
        return "-"
    return f"{r[k] / base[k]:.2f}x"
when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
md = [f"{when}, git {rev}, profile {profile}; medians of {repeat} run(s) per variant, order rotated; "
      f"c16: {duration} s closed loop, 16 tunnels, 1 worker pinned; idle: {tunnels} tunnels, parked after {hold} s, "
      f"settled 5 s after they closed. Ratios: variant / `{variants[0]}`.", ""]
md.append(f"| allocator | c16 req/s | c16 p99 µs | CPU-s / 1k req | vs {variants[0]} | c16 peak RSS MiB | idle B/tunnel just idle | vs {variants[0]} | idle B/tunnel parked | vs {variants[0]} | idle peak RSS MiB | settled RSS MiB | vs {variants[0]} |")
md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    md.append(f"| {r['variant']} | {fmt(r['c16_rps'])} | {fmt(r['c16_p99_us'])} | {fmt(r['c16_cpu_s_per_1k'], 4)} | {vs(r, 'c16_cpu_s_per_1k')} | "
              f"{mib(r['c16_peak_rss_kb'])} | {fmt(r['idle_bytes_per_tunnel_early'])} | {vs(r, 'idle_bytes_per_tunnel_early')} | "
              f"{fmt(r['idle_bytes_per_tunnel_parked'])} | {vs(r, 'idle_bytes_per_tunnel_parked')} | {mib(r['idle_peak_rss_kb'])} | "
              f"{mib(r['idle_settled_rss_kb'])} | {vs(r, 'idle_settled_rss_kb')} |")
if failures:
    md += ["", "**Failed or incomplete (do not publish):** " + "; ".join(failures)]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
json.dump({"rows": rows, "failures": failures, "git": rev, "profile": profile, "repeat": int(repeat)},
          open(os.path.join(out, "summary.json"), "w"), indent=2)
print("\n".join(md))
sys.exit(1 if failures else 0)
PY
log "summary: $OUT/summary.md"
