#!/usr/bin/env bash
# A variant of the demo's SALM stage (a config overlay on conf/demo.yaml) for several seeds, each on the CTC encoder
# that scripts/demo_seeds.sh trained for the same seed; evaluated on the held-out test splits and summarised as
# ranges beside each other (python -m salm_mtp.sweep).
#   bash scripts/demo_variant.sh mix conf/demo_mix.yaml        # speech + text + spoken conversations
#   bash scripts/demo_variant.sh lora conf/demo_lora.yaml      # LoRA on the LLM instead of full fine-tuning
# Extra arguments go to `salm-mtp fit`. Env: SEEDS ("1234 11"), SWEEP (runs/seeds: the seed runs), OUT
# (runs/variants/NAME), DATA (data/demo), EXTRA_EVAL (more test sets to score, e.g. "text_test.jsonl talk_test.jsonl").
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="$1"; OVERLAY="$2"; shift 2
PY="${SALM_VENV:-.venv}/bin/python"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
SEEDS="${SEEDS:-1234 11}"
SWEEP="${SWEEP:-runs/seeds}"
OUT="${OUT:-runs/variants/$NAME}"
DATA="${DATA:-data/demo}"
dirs=()
for s in $SEEDS; do
  run="$OUT/seed$s"
  enc="$SWEEP/seed$s/encoder_ctc_hf"
  if [ ! -f "$enc/pretrain_result.json" ]; then
    echo "error: $enc has no pretrain_result.json: run SEEDS=\"$s\" bash scripts/demo_seeds.sh first" >&2
    exit 2
  fi
  mkdir -p "$run"
  ln -sfn "$(cd "$enc" && pwd)" "$run/encoder_ctc_hf"
  dirs+=("$run")
  echo "== $NAME, seed $s -> $run"
  t0=$(date +%s)
  "$PY" -m salm_mtp.cli fit --config conf/demo.yaml --config "$OVERLAY" --seed_everything="$s" --data.seed="$s" \
    --model.tokenizer_path="$DATA/tokenizer" --trainer.default_root_dir="$run" --model.encoder.path="$run/encoder_ctc_hf" \
    "$@" > "$run/fit.log" 2>&1 || { tail -20 "$run/fit.log"; exit 1; }
  ckpt=$(grep -E '^checkpoint: ' "$run/fit.log" | tail -1 | awk '{print $2}')
  echo "   fit: $(( $(date +%s) - t0 )) s, $ckpt"
  "$PY" -m salm_mtp.cli evaluate --ckpt "$ckpt" --manifest "$DATA/test_cuts.jsonl.gz" --out "$run/eval" --no-progress \
    > "$run/eval.log" 2>&1
  "$PY" -m salm_mtp.cli evaluate --ckpt "$ckpt" --manifest "$DATA/test_unseen_voice_cuts.jsonl.gz" \
    --out "$run/eval_unseen_voice" --no-progress > "$run/eval_unseen_voice.log" 2>&1
  for extra in ${EXTRA_EVAL:-}; do
    "$PY" -m salm_mtp.cli evaluate --ckpt "$ckpt" --manifest "$DATA/$extra" --out "$run/eval_${extra%%.*}" \
      --no-progress > "$run/eval_${extra%%.*}.log" 2>&1
  done
done
"$PY" -m salm_mtp.sweep "${dirs[@]}" --out "$OUT"
