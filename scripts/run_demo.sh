#!/usr/bin/env bash
# The main job on a fresh clone: set up, make the spoken demo corpus, CTC-pretrain the tiny
# Parakeet encoder, train SALM with MTP (conf/demo.yaml), evaluate on the test split, print metrics.
# Override sizes with env vars: DEMO_TRAIN (utterances), ENC_STEPS, SALM_STEPS, RUN (output dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${SALM_VENV:-.venv}/bin/python"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
RUN="${RUN:-runs/demo}"
DEMO_TRAIN="${DEMO_TRAIN:-6000}"
ENC_STEPS="${ENC_STEPS:-1200}"
SALM_STEPS="${SALM_STEPS:-900}"
t0=$(date +%s)
mkdir -p "$RUN"

echo "== 1/4 demo corpus (espeak-ng + sox) -> data/demo"
"$PY" -m salm_mtp.cli make-demo-data --out data/demo --num-train "$DEMO_TRAIN"

echo "== 2/4 CTC pretraining of the encoder -> $RUN/encoder_ctc_hf"
"$PY" -m salm_mtp.cli pretrain-encoder fit --config conf/encoder_ctc.yaml \
  --trainer.default_root_dir="$RUN" --trainer.max_steps="$ENC_STEPS" --model.export_dir="$RUN/encoder_ctc_hf"

echo "== 3/4 SALM + MTP training (conf/demo.yaml)"
"$PY" -m salm_mtp.cli fit --config conf/demo.yaml --trainer.default_root_dir="$RUN" \
  --trainer.max_steps="$SALM_STEPS" --model.encoder.path="$RUN/encoder_ctc_hf" 2>&1 | tee "$RUN/fit.log"
CKPT=$(grep -E '^checkpoint: ' "$RUN/fit.log" | tail -1 | awk '{print $2}')
LOGDIR=$(grep -E '^logs: ' "$RUN/fit.log" | tail -1 | awk '{print $2}')

echo "== 4/4 evaluation on the test split -> $RUN/eval"
"$PY" -m salm_mtp.cli evaluate --ckpt "$CKPT" --manifest data/demo/test_cuts.jsonl.gz --out "$RUN/eval" \
  --metrics-csv "$LOGDIR/metrics.csv"   # data and prompt settings: the run's own $LOGDIR/config.yaml
echo
echo "checkpoint: $CKPT"
echo "logs:       $LOGDIR"
echo "report:     $RUN/eval/report.png  metrics: $RUN/eval/metrics.json  hyps: $RUN/eval/hyps.jsonl"
echo "total time: $(( $(date +%s) - t0 )) s"
