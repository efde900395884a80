#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec "${SALM_VENV:-.venv}/bin/python" -m pytest -q "$@"
