#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite; its 25 slowest tests are listed at the end. Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec "${SALM_VENV:-.venv}/bin/python" -m pytest -q --durations=25 "$@"  # the 25 slowest tests listed at the end
