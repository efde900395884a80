#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite; its 25 slowest tests are listed at the end. Extra arguments
# go to pytest.
#
# Two pytest-xdist workers (SALM_TEST_WORKERS; 0: none), each test file on one worker (its module fixtures are
# built once), one torch thread per process (OMP_NUM_THREADS=1): on 2 cores the subprocess launches and the
# single-threaded Python of one worker overlap the other's work instead of two thread pools fighting.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
workers="${SALM_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadfile); fi
exec "${SALM_VENV:-.venv}/bin/python" -m pytest -q --durations=25 "${parallel[@]}" "$@"
