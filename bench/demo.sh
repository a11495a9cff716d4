#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded defaults (all-MiniLM-L6-v2 teacher, CPU),
# on 16 pinned real projects from the package index. Every step resumes: a second run reuses
# what is done. Output: $DEMO_DIR (default ~/.cache/codejepa/demo), plots in $DEMO_DIR/eval/.
# PROBES=N (default 0: off) adds the probe view of N fixed train bodies (`embed probe`, then
# `evaluate retrieval --probe`): N more teacher passes per record, about 50 s per probe here.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-$HOME/.cache/codejepa/demo}
EPOCHS_MLP=${EPOCHS_MLP:-20}
EPOCHS_TF=${EPOCHS_TF:-6}
PROBES=${PROBES:-0}
mkdir -p "$DEMO_DIR"
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
start=$(date +%s)

# 9 train, 2 val and 5 test repositories with seed 0 (the split is a hash of the repo name).
SOURCES=(
  pypi:idna==3.10 pypi:h11==0.14.0 pypi:blinker==1.9.0 pypi:itsdangerous==2.2.0
  pypi:cachetools==5.5.0 pypi:tenacity==9.0.0 pypi:toolz==1.0.0 pypi:more-itertools==10.5.0
  pypi:attrs==24.2.0 pypi:click==8.1.7 pypi:markdown==3.7 pypi:tomlkit==0.13.2
  pypi:pluggy==1.5.0 pypi:packaging==24.2 pypi:sortedcontainers==2.4.0 pypi:arrow==1.3.0
)

step "1/4 corpus build (sdists from the package index, test code excluded)"
codejepa corpus build "${SOURCES[@]}" --out "$DEMO_DIR/corpus" --exclude-tests --workers 2

step "2/4 embed run (default teacher, middle layer)"
codejepa embed run "$DEMO_DIR/corpus" --out "$DEMO_DIR/store.h5"
codejepa embed info "$DEMO_DIR/store.h5"
PROBE_ARGS=()
if (( PROBES > 0 )); then
  step "2/4 embed probe ($PROBES fixed train bodies read after each record's inputs)"
  # one view file per probe count: a view is refused for other settings, so a rerun with
  # another PROBES must not meet the last one's file
  view="$DEMO_DIR/store.probe-$PROBES.h5"
  codejepa embed probe "$DEMO_DIR/store.h5" --probes "$PROBES" --out "$view"
  PROBE_ARGS=(--probe "$view")
fi

train() {  # NAME ARGS...: train into $DEMO_DIR/runs/NAME, or continue an unfinished run
  local name=$1; shift
  local out="$DEMO_DIR/runs/$name"
  if [[ -f $out/last.pt ]]; then
    codejepa predict train "$DEMO_DIR/store.h5" --out "$out" --resume
  else
    codejepa predict train "$DEMO_DIR/store.h5" --out "$out" "$@"
  fi
}
step "3/4 predict train: the seed's MLP, then the per-token transformer on the ridge path (brief)"
# One torch thread each: on a 2-core machine two threads measured up to 20x slower under load.
train seed-mlp --model mlp --preset seed-mlp --set train.epochs="$EPOCHS_MLP" --set train.threads=1
train transformer-residual --model transformer --preset transformer-residual --set train.epochs="$EPOCHS_TF" \
  --set train.threads=1

step "4/4 evaluate retrieval: test-split pool, every baseline, every space"
codejepa evaluate retrieval "$DEMO_DIR/store.h5" \
  --run "$DEMO_DIR/runs/seed-mlp" --run "$DEMO_DIR/runs/transformer-residual" "${PROBE_ARGS[@]}" --out "$DEMO_DIR/eval"

echo >&2
echo "demo finished in $(( $(date +%s) - start )) s; table: $DEMO_DIR/eval/table.txt, plots: $DEMO_DIR/eval/*.png" >&2
