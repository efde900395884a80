#!/usr/bin/env bash
# Joint training, then head-only training of a new 2-depth MTP head from that model: CE vs KL vs LK
# self-distillation vs init_from_backbone, same number of head steps, same seed; each evaluated on the
# test split (teacher-forced chained acceptance per depth, mean accepted length, WER). Run after scripts/run_demo.sh
# (it reuses data/demo and runs/demo/encoder_ctc_hf). Env: STEPS (900), OUT (runs/mtp_recipes), SEED (1234: training
# seed and data.seed), VARIANTS (head-only variants, default "ce kl lk ce_init_from_backbone"), ENC, DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${SALM_VENV:-.venv}/bin/python"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
STEPS="${STEPS:-900}"
OUT="${OUT:-runs/mtp_recipes}"
ENC="${ENC:-runs/demo/encoder_ctc_hf}"
DATA="${DATA:-data/demo}"
TEST="$DATA/test_cuts.jsonl.gz"
SEED="${SEED:-1234}"
VARIANTS="${VARIANTS:-ce kl lk ce_init_from_backbone}"
SEEDED=(--seed_everything="$SEED" --data.seed="$SEED" --data.train_manifest="$DATA/train_cuts.jsonl.gz"
        --data.val_manifest="$DATA/dev_cuts.jsonl.gz" --model.tokenizer_path="$DATA/tokenizer")
mkdir -p "$OUT"
ckpt_of() { grep -E '^checkpoint: ' "$1" | tail -1 | awk '{print $2}'; }

echo "== joint: backbone + D=2 CE head, $STEPS steps"
"$PY" -m salm_mtp.cli fit --config conf/demo.yaml "${SEEDED[@]}" --trainer.default_root_dir="$OUT/joint" \
  --trainer.max_steps="$STEPS" --model.encoder.path="$ENC" --model.mtp.num_layers=2 2>&1 | tee "$OUT/joint.log"
JOINT=$(ckpt_of "$OUT/joint.log")
"$PY" -m salm_mtp.cli export --ckpt "$JOINT" --out "$OUT/joint_export" --force  # a re-run replaces its own export
"$PY" -m salm_mtp.cli evaluate --ckpt "$JOINT" --manifest "$TEST" --out "$OUT/eval_joint_ce"

E="$OUT/joint_export"
for variant in $VARIANTS; do
  loss="${variant%%_*}"
  init=false; [ "$variant" = ce_init_from_backbone ] && init=true
  echo "== head_only $variant: new D=2 head, $STEPS head steps"
  "$PY" -m salm_mtp.cli fit --config conf/demo.yaml --config conf/demo_head_only.yaml "${SEEDED[@]}" \
    --trainer.default_root_dir="$OUT/head_$variant" --trainer.max_steps="$STEPS" \
    --model.llm.path="$E/llm" --model.encoder.path="$E/encoder" --model.adapter.path="$E/adapter.safetensors" \
    --model.mtp.loss="$loss" --model.mtp.init_from_backbone="$init" 2>&1 | tee "$OUT/head_$variant.log"
  "$PY" -m salm_mtp.cli evaluate --ckpt "$(ckpt_of "$OUT/head_$variant.log")" --manifest "$TEST" --out "$OUT/eval_head_$variant"
done

"$PY" - "$OUT" $VARIANTS <<'PYEOF'
import json, sys, os
out = sys.argv[1]
rows = [("joint CE (D=2)", "eval_joint_ce")] + [(f"head_only {v}", f"eval_head_{v}") for v in sys.argv[2:]]
base = None
print(f"| run | WER | teacher-forced chained acc. depth 1 | depth 2 | mean accepted length | vs joint |")
print("|---|---|---|---|---|---|")
for name, d in rows:
    m = json.load(open(os.path.join(out, d, "metrics.json")))
    mal = m["teacher_forced_mean_accepted_length"]
    base = mal if base is None else base
    c = m["mtp_teacher_forced_chained_acceptance"]
    print(f"| {name} | {100 * m['wer']:.2f}% | {100 * c[0]:.1f}% | {100 * c[1]:.1f}% | {mal:.3f} | {100 * (mal / base - 1):+.1f}% |")
PYEOF
