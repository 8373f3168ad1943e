#!/usr/bin/env bash
# benches/scaling.sh: the scaling check. Runs benches/run.sh twice on the same scenarios, once
# with one worker thread in each proxy and once with two (waypoint --workers, envoy
# --concurrency), both unpinned (PIN=0: on a 2-CPU machine the load generator has nowhere
# else to go), and puts the two side by side with benchtool scaling:
# target/bench/scaling-<UTC timestamp>/{scaling.md,scaling.json,one,two}.
#
# What it shows and what it cannot: the proxy shares the CPUs with the load generator and
# the backend, so req/s cannot double; CPU time per request staying flat from 1 to 2 workers
# is the evidence that workers do not cost each other (benches/README.md, "Scaling check").
#
# Environment: SCENARIOS (default "c16 c64 c64n8"), DURATION, WARMUP, REPEAT, TARGETS, BUILD as for
# run.sh; UPDATE_README=1 writes the table between <!-- bench-scaling:begin/end --> markers
# in README.md and benches/README.md (default 0). Exit 3 when a run failed (READMEs untouched).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SCENARIOS="${SCENARIOS:-c16 c64 c64n8}"
UPDATE_README="${UPDATE_README:-0}"
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$TARGET_DIR/bench/scaling-$RUN_ID"
OUT_REL="${OUT#"$ROOT"/}"   # as the README shows it: relative to the repository when inside it
mkdir -p "$OUT"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

build="${BUILD:-1}"
for workers in 1 2; do
  log "scaling check: $workers worker(s), SCENARIOS=\"$SCENARIOS\", PIN=0"
  rc=0
  SCENARIOS="$SCENARIOS" WORKERS="$workers" PIN=0 UPDATE_README=0 BUILD="$build" \
    "$ROOT/benches/run.sh" >"$OUT/run-$workers.log" 2>&1 || rc=$?
  # run.sh points target/bench/latest at its run; keep that run under this check.
  run_dir="$(readlink -f "$TARGET_DIR/bench/latest")"
  name="$([[ $workers == 1 ]] && echo one || echo two)"
  ln -sfn "$run_dir" "$OUT/$name"
  if ((rc != 0)); then
    log "run.sh with $workers worker(s) failed (exit $rc); see $OUT/run-$workers.log"
    tail -n 20 "$OUT/run-$workers.log" >&2 || true
    exit "$rc"
  fi
  build=0
done

README_ARGS=()
if [[ "$UPDATE_README" == 1 ]]; then
  for f in "$ROOT/README.md" "$ROOT/benches/README.md"; do
    [[ -f "$f" ]] && README_ARGS+=(--readme "$f")
  done
fi
CMD="SCENARIOS=\"$SCENARIOS\" benches/scaling.sh"
rc=0
(cd "$ROOT" && "$TARGET_DIR/release/benchtool" scaling --one "$OUT/one" --two "$OUT/two" \
  --out-dir "$OUT_REL" --command "$CMD" "${README_ARGS[@]}" >/dev/null) || rc=$?
cat "$OUT/scaling.md"
exit "$rc"
