#!/usr/bin/env bash
# Multi-node launch without SLURM: run the same command on every node (torchrun starts one process per GPU and
# Lightning reads its environment). NNODES, NPROC (GPUs per node) and HEAD (the first node's address) must agree
# on every node; resume by adding --ckpt_path=DIR (a sharded checkpoint directory or a .ckpt file).
#   NNODES=4 NPROC=8 HEAD=node001 bash scripts/torchrun_fit.sh --config conf/nemotron3_nano_30b.yaml
set -euo pipefail
NNODES="${NNODES:-1}"
NPROC="${NPROC:-8}"
HEAD="${HEAD:-localhost}"
exec "${SALM_VENV:-.venv}/bin/torchrun" --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$HEAD:${PORT:-29500}" --rdzv_id "${RDZV_ID:-salm-mtp}" \
  -m salm_mtp.cli fit "$@" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC" \
  --trainer.strategy.init_args.data_parallel_size=$(( NNODES * NPROC ))
