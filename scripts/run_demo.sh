#!/usr/bin/env bash
# The main job on a fresh clone: set up, make the spoken demo corpus, CTC-pretrain the tiny Parakeet encoder
# until its dev WER reaches a target, train SALM with MTP (conf/demo.yaml), evaluate on the held-out test
# splits (unseen sentences; unseen sentences and voices), print metrics.
# Env: DEMO_TRAIN (train utterances), DEMO_HELDOUT (dev / test / unseen-voice utterances each), CORPUS_SEED,
#      SEED (training seed and data.seed together), ENC_STEPS (encoder step cap), ENC_TARGET_WER (fraction),
#      SALM_STEPS, RUN (output dir), DATA (corpus dir), ENC_ARGS / SALM_ARGS (extra flags of the two stages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${SALM_VENV:-.venv}/bin/python"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
RUN="${RUN:-runs/demo}"
DATA="${DATA:-data/demo}"
DEMO_TRAIN="${DEMO_TRAIN:-6000}"
DEMO_HELDOUT="${DEMO_HELDOUT:-200}"
CORPUS_SEED="${CORPUS_SEED:-0}"
SEED="${SEED:-1234}"
ENC_STEPS="${ENC_STEPS:-3000}"
ENC_TARGET_WER="${ENC_TARGET_WER:-0.1}"
SALM_STEPS="${SALM_STEPS:-900}"
t0=$(date +%s)
mkdir -p "$RUN"
DATA_ARGS=(--data.train_manifest="$DATA/train_cuts.jsonl.gz" --data.val_manifest="$DATA/dev_cuts.jsonl.gz"
           --model.tokenizer_path="$DATA/tokenizer" --seed_everything="$SEED" --data.seed="$SEED")

echo "== 1/4 demo corpus (espeak-ng + sox) -> $DATA"
"$PY" -m salm_mtp.cli make-demo-data --out "$DATA" --num-train "$DEMO_TRAIN" --num-dev "$DEMO_HELDOUT" \
  --num-test "$DEMO_HELDOUT" --num-unseen-voice "$DEMO_HELDOUT" --seed "$CORPUS_SEED"

echo "== 2/4 CTC pretraining of the encoder until dev WER <= $ENC_TARGET_WER (at most $ENC_STEPS steps) -> $RUN/encoder_ctc_hf"
rm -f "$RUN/encoder_ctc_hf/pretrain_result.json"
"$PY" -m salm_mtp.cli pretrain-encoder fit --config conf/encoder_ctc.yaml "${DATA_ARGS[@]}" \
  --trainer.default_root_dir="$RUN" --trainer.max_steps="$ENC_STEPS" --model.export_dir="$RUN/encoder_ctc_hf" \
  --model.target_wer="$ENC_TARGET_WER" ${ENC_ARGS:-}
"$PY" -c 'import sys; from salm_mtp.pretrain import require_target; sys.exit(require_target(sys.argv[1]))' \
  "$RUN/encoder_ctc_hf"

echo "== 3/4 SALM + MTP training (conf/demo.yaml)"
"$PY" -m salm_mtp.cli fit --config conf/demo.yaml "${DATA_ARGS[@]}" --data.test_manifest="$DATA/test_cuts.jsonl.gz" \
  --trainer.default_root_dir="$RUN" --trainer.max_steps="$SALM_STEPS" --model.encoder.path="$RUN/encoder_ctc_hf" \
  ${SALM_ARGS:-} 2>&1 | tee "$RUN/fit.log"
CKPT=$(grep -E '^checkpoint: ' "$RUN/fit.log" | tail -1 | awk '{print $2}')
LOGDIR=$(grep -E '^logs: ' "$RUN/fit.log" | tail -1 | awk '{print $2}')

echo "== 4/4 evaluation on the held-out test splits -> $RUN/eval, $RUN/eval_unseen_voice"
"$PY" -m salm_mtp.cli evaluate --ckpt "$CKPT" --manifest "$DATA/test_cuts.jsonl.gz" --out "$RUN/eval" \
  --metrics-csv "$LOGDIR/metrics.csv"   # data and prompt settings: the run's own $LOGDIR/config.yaml
"$PY" -m salm_mtp.cli evaluate --ckpt "$CKPT" --manifest "$DATA/test_unseen_voice_cuts.jsonl.gz" \
  --out "$RUN/eval_unseen_voice" --metrics-csv "$LOGDIR/metrics.csv"
echo
echo "checkpoint: $CKPT"
echo "logs:       $LOGDIR"
echo "report:     $RUN/eval/report.png  metrics: $RUN/eval/metrics.json, $RUN/eval_unseen_voice/metrics.json"
echo "total time: $(( $(date +%s) - t0 )) s"
