#!/usr/bin/env bash
# The demo for N training seeds (seed_everything and data.seed together), then one table of every run's encoder
# dev WER, test WER (sentences not in train) per kind, unseen-voice WER, depth-1 acceptance and mean accepted
# length, with min / median / max.  Usage: bash scripts/demo_seeds.sh [N]   (default 3)
# Env: SEEDS (the seeds, default the first N of "1234 11 22 33 44 ..."), VARY_CORPUS=1 (each seed also draws its
# own corpus, under data/demo_seed<S>), OUT (runs/seeds), REUSE=1 (keep runs that already have their metrics),
# and every variable of scripts/run_demo.sh (DEMO_TRAIN, ENC_STEPS, ENC_TARGET_WER, SALM_STEPS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-3}"
OUT="${OUT:-runs/seeds}"
ALL=(1234 11 22 33 44 55 66 77 88 99)
SEEDS="${SEEDS:-${ALL[*]:0:$N}}"
mkdir -p "$OUT"
dirs=()
for s in $SEEDS; do
  run="$OUT/seed$s"
  dirs+=("$run")
  if [ "${REUSE:-0}" = 1 ] && [ -f "$run/eval_unseen_voice/metrics.json" ]; then
    echo "== seed $s: reusing $run"
    continue
  fi
  data="${DATA:-data/demo}"; corpus_seed="${CORPUS_SEED:-0}"
  if [ "${VARY_CORPUS:-0}" = 1 ]; then data="data/demo_seed$s"; corpus_seed="$s"; fi
  echo "== seed $s -> $run (corpus $data, corpus seed $corpus_seed; log $run.log)"
  if ! SEED="$s" RUN="$run" DATA="$data" CORPUS_SEED="$corpus_seed" bash scripts/run_demo.sh > "$run.log" 2>&1; then
    echo "   seed $s failed: tail of $run.log:"; tail -5 "$run.log"
  fi
done
"${SALM_VENV:-.venv}/bin/python" -m salm_mtp.sweep "${dirs[@]}" --out "$OUT"
