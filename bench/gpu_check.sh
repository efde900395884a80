#!/usr/bin/env bash
# The prepared GPU check (one CUDA device, under 8 minutes on one H200): one JSON of everything it measured.
#
#   bash bench/gpu_check.sh [--out DIR]          # on the GPU machine (DIR: default $OUT if set, else runs/gpu_check)
#   bash bench/gpu_check.sh --dry-run --out DIR  # the same pipeline on the CPU, tiny sizes (also GPU_CHECK_DRY_RUN=1)
#
# Steps, each under its own timeout inside one overall budget, each recorded as ok / failed / timeout / skipped
# with its seconds, error line and figures (a failing step never loses the others):
#   env            nvidia-smi, torch and CUDA, the device, package versions vs requirements.txt
#   deps           only with GPU_CHECK_WHEELS=DIR: pip install --no-index --no-deps --target WORK/site DIR/*.whl
#                  (packages the machine lacks, e.g. lhotse, jsonargparse; put on PYTHONPATH for the later steps)
#   mamba_kernels  pip install mamba-ssm causal-conv1d (short timeout, torch pinned to the installed version by a
#                  constraints file, no build isolation), then whether they import (if not, the fit runs
#                  transformers' pure-torch scan, and the JSON says so); skipped on --dry-run or GPU_CHECK_PIP=0
#   data           the demo corpus (salm-mtp make-demo-data, small) unless GPU_CHECK_MANIFEST is given
#   fit            a short bf16 FSDP2 fit of the demo in ONE process: conf/demo_fsdp2.yaml + conf/demo_fsdp2_cuda.yaml
#                  (SALMParallelStrategy, data_parallel_size 1, fp32 master weights, FSDP2 param_dtype bfloat16,
#                  reduce_dtype float32); loss / mtp_loss from its metrics.csv, steps/s from gpu_check.StepTimer
#   loss_memory    bench/loss_memory.py --device cuda at the real size (H = T = 2048, V = 131072; cce = Triton kernel)
#   mtp_overhead   bench/mtp_overhead.py --device cuda --precision bf16-mixed (demo and cpu_large sizes)
#   decode         bench/decode.py --device cuda on the fit's checkpoint (an untrained demo model if it wrote none)
# then bench/gpu_check.py assemble writes OUTDIR/gpu_check.json (+ gpu_check.log, loss_memory.json,
# mtp_overhead.json, decode.json: five files). Exit status 0 when every step is ok or skipped, else 1.
#
# --dry-run: device cpu, fp32, the tiny model overlay (tests/conf/tiny_model.yaml), 4 fit steps, tiny benchmark
# sizes, no pip; a synthetic corpus unless GPU_CHECK_MANIFEST is given. Tested by tests/recipes/test_gpu_check.py.
#
# Env: GPU_CHECK_WORK (checkpoints, corpus, logs; default OUTDIR/work, or a fresh /tmp dir when OUTDIR is $OUT so
#      that only the five files come back), GPU_CHECK_PY (python; default .venv/bin/python if present, else python3),
#      GPU_CHECK_BUDGET_S (overall seconds; default 450, dry run 240), GPU_CHECK_FIT_STEPS (default 60, dry run 4),
#      GPU_CHECK_MANIFEST + GPU_CHECK_TOKENIZER (one lhotse manifest used for train / val / test, and its tokenizer,
#      instead of the demo corpus), GPU_CHECK_DATA (demo corpus dir; reused when its meta.json matches),
#      GPU_CHECK_WHEELS (wheel dir, see deps), GPU_CHECK_PIP=0 (no pip install), GPU_CHECK_PIP_TIMEOUT (default 90),
#      GPU_CHECK_FIT_ARGS (extra salm-mtp fit flags, space-separated).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; OUTDIR="$2"; shift ;;
    --out=*) OUTDIR="${1#--out=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (options: --dry-run, --out DIR, --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DRY_RUN" in 0|1) ;; *) echo "gpu_check.sh: GPU_CHECK_DRY_RUN must be 0 or 1, got '$DRY_RUN'" >&2; exit 2 ;; esac
if [ -n "${GPU_CHECK_MANIFEST:-}" ] && [ -z "${GPU_CHECK_TOKENIZER:-}" ]; then
  echo "gpu_check.sh: GPU_CHECK_MANIFEST needs GPU_CHECK_TOKENIZER (the tokenizer directory) too" >&2; exit 2
fi
need_int() {  # NAME VALUE: exit 2 naming NAME unless VALUE is a positive integer
  case "$2" in ''|*[!0-9]*|0) echo "gpu_check.sh: $1 must be a positive integer, got '$2'" >&2; exit 2 ;; esac
}
if [ -z "$OUTDIR" ]; then
  OUTDIR="${OUT:-runs/gpu_check}"
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"
elif [ -n "${OUT:-}" ] && [ "$OUTDIR" = "$(cd "$OUT" 2>/dev/null && pwd)" ]; then
  WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"     # $OUT brings back few files: keep the bulk out of it
else
  WORK="$OUTDIR/work"
fi
mkdir -p "$WORK/steps"
WORK="$(cd "$WORK" && pwd)"

if [ -n "${GPU_CHECK_PY:-}" ]; then PY="$GPU_CHECK_PY"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
export PYTHONPATH="$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DRY_RUN" = 1 ]; then
  MODE=dry_run DEV=cpu
  BUDGET_S="${GPU_CHECK_BUDGET_S:-240}"
  FIT_STEPS="${GPU_CHECK_FIT_STEPS:-4}"
  DATA_ARGS=(--synthetic --num-train 24 --num-dev 4 --num-test 4 --num-unseen-voice 2 --workers 2)
  FIT_MODE_ARGS=(--config tests/conf/tiny_model.yaml --trainer.accelerator=cpu --model.parallel.param_dtype=null
                 --model.parallel.reduce_dtype=null --data.num_workers=0)
  LM_ARGS=(--vocab 512 --hidden 32 --tokens 64 --chunk-sizes 16 --no-cce)
  MO_ARGS=(--sizes demo --repeats 1 --warmup 1 --max-duration 2)
  DEC_ARGS=(--limit 4 --batch-sizes 2 --repeats 1 --max-new-tokens 4)
else
  MODE=gpu DEV=cuda
  BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
  FIT_STEPS="${GPU_CHECK_FIT_STEPS:-60}"
  DATA_ARGS=(--num-train 800 --num-dev 16 --num-test 32 --num-unseen-voice 4 --workers 8)
  FIT_MODE_ARGS=()
  LM_ARGS=(--hidden 2048 --tokens 2048 --repeats 1)
  MO_ARGS=(--sizes demo,cpu_large --repeats 10 --warmup 3 --precision bf16-mixed)
  DEC_ARGS=(--limit 32 --batch-sizes 1,16 --repeats 2 --max-new-tokens 32 --oracle)
fi
need_int GPU_CHECK_BUDGET_S "$BUDGET_S"
need_int GPU_CHECK_FIT_STEPS "$FIT_STEPS"
need_int GPU_CHECK_PIP_TIMEOUT "${GPU_CHECK_PIP_TIMEOUT:-90}"
read -r -a FIT_EXTRA <<< "${GPU_CHECK_FIT_ARGS:-}"
rm -f "$WORK"/steps/* "$OUTDIR"/{gpu_check.json,gpu_check.log,loss_memory.json,mtp_overhead.json,decode.json}
RESERVE_S=15                               # kept for assemble at the end
DEADLINE=$(( $(date +%s) + BUDGET_S ))
echo "gpu_check: mode $MODE, budget ${BUDGET_S} s, out $OUTDIR, work $WORK, python $PY"

skip_step() {  # NAME REASON: record a step as skipped
  echo "$2" > "$WORK/steps/$1.skipped"
  echo "== $1: skipped ($2)"
}

run_step() {  # NAME CAP_S CMD...: run CMD under min(CAP_S, time left), recording rc, seconds and log
  local name="$1" cap="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) - RESERVE_S ))
  if [ "$left" -lt 5 ]; then skip_step "$name" "no time left in the ${BUDGET_S} s budget"; return 0; fi
  local limit=$(( cap < left ? cap : left )) rc=0 t0 t1
  echo "== $name (at most ${limit} s): $*"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/steps/$name.log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  echo "$rc" > "$WORK/steps/$name.rc"
  echo "$limit" > "$WORK/steps/$name.timeout"
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", b - a }' > "$WORK/steps/$name.seconds"
  echo "   exit $rc after $(cat "$WORK/steps/$name.seconds") s"
  if [ "$rc" != 0 ]; then tail -n 3 "$WORK/steps/$name.log" | sed 's/^/   | /'; fi
}

# -- env
run_step env 60 "$PY" bench/gpu_check.py env --out "$WORK/env.json"

# -- deps: wheels the machine lacks
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  printf '{"wheels": "%s", "target": "%s"}\n' "$GPU_CHECK_WHEELS" "$WORK/site" > "$WORK/deps.json"
  run_step deps 90 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$WORK/site" "$GPU_CHECK_WHEELS"/*.whl
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
else
  skip_step deps "GPU_CHECK_WHEELS not set: the machine's own packages"
fi

# -- mamba_kernels
if [ "$DRY_RUN" = 1 ] || [ "${GPU_CHECK_PIP:-1}" = 0 ]; then
  "$PY" bench/gpu_check.py kernels --out "$WORK/kernels.json" > /dev/null 2>&1 || true   # figures only
  skip_step mamba_kernels "$([ "$DRY_RUN" = 1 ] && echo "dry run" || echo "GPU_CHECK_PIP=0"): no pip install"
else
  PIP_T="${GPU_CHECK_PIP_TIMEOUT:-90}"
  run_step mamba_kernels $(( PIP_T + 30 )) "$PY" bench/gpu_check.py kernels --install --timeout "$PIP_T" \
    --out "$WORK/kernels.json" ${GPU_CHECK_WHEELS:+--wheels "$GPU_CHECK_WHEELS"}
fi

# -- data
if [ -n "${GPU_CHECK_MANIFEST:-}" ]; then
  TRAIN="$GPU_CHECK_MANIFEST" VAL="$GPU_CHECK_MANIFEST" TEST="$GPU_CHECK_MANIFEST" TOK="$GPU_CHECK_TOKENIZER"
  skip_step data "GPU_CHECK_MANIFEST given: $TRAIN"
else
  DATA="${GPU_CHECK_DATA:-$WORK/data}"
  TRAIN="$DATA/train_cuts.jsonl.gz" VAL="$DATA/dev_cuts.jsonl.gz" TEST="$DATA/test_cuts.jsonl.gz" TOK="$DATA/tokenizer"
  run_step data 90 "$PY" -m salm_mtp.cli make-demo-data --out "$DATA" "${DATA_ARGS[@]}" --no-progress
  if [ "$DRY_RUN" = 1 ]; then FIT_MODE_ARGS+=(--data.max_duration=8.0); fi   # demo clips are 0.5-4 s long
fi
printf '{"train": "%s", "val": "%s", "test": "%s", "tokenizer": "%s"}\n' "$TRAIN" "$VAL" "$TEST" "$TOK" \
  > "$WORK/data.json"

# -- fit
rm -rf "$WORK/fit"
run_step fit 210 "$PY" -m salm_mtp.cli fit --config conf/demo_fsdp2.yaml --config conf/demo_fsdp2_cuda.yaml \
  "${FIT_MODE_ARGS[@]}" --trainer.default_root_dir="$WORK/fit" --trainer.max_steps="$FIT_STEPS" \
  --model.tokenizer_path="$TOK" --data.train_manifest="$TRAIN" --data.val_manifest="$VAL" \
  --data.test_manifest=null --trainer.callbacks+=gpu_check.StepTimer "${FIT_EXTRA[@]}"

# -- benchmarks
run_step loss_memory 120 "$PY" bench/loss_memory.py --device "$DEV" "${LM_ARGS[@]}" --out "$OUTDIR/loss_memory.json"
run_step mtp_overhead 120 "$PY" bench/mtp_overhead.py --device "$DEV" "${MO_ARGS[@]}" --manifest "$TRAIN" \
  --tokenizer "$TOK" --out "$OUTDIR/mtp_overhead.json"
CKPT="$(compgen -G "$WORK/fit/salm/version_*/checkpoints/last.ckpt" | tail -n 1 || true)"
if [ -n "$CKPT" ]; then MODEL_ARGS=(--ckpt "$CKPT"); else MODEL_ARGS=(--tokenizer "$TOK"); fi
run_step decode 120 "$PY" bench/decode.py --device "$DEV" "${MODEL_ARGS[@]}" --manifest "$TEST" "${DEC_ARGS[@]}" \
  --out "$OUTDIR"

# -- one JSON
rc=0
"$PY" bench/gpu_check.py assemble --out "$OUTDIR" --work "$WORK" --mode "$MODE" --budget-s "$BUDGET_S" || rc=$?
exit "$rc"
