#!/usr/bin/env bash
# Set up a fresh clone: speech tools (espeak-ng, sox) when root, a virtualenv with the pinned
# requirements (torch pinned to the local CPU wheel by constraints.txt) and the package itself.
# Idempotent: a second run only checks. The venv lives in $SALM_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing espeak-ng and sox" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null
  else
    echo "[setup] WARNING: espeak-ng/sox missing and not root: the demo corpus falls back to synthetic tones" >&2
  fi
fi
VENV="${SALM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
stamp="$VENV/.salm_requirements"
if ! cmp -s requirements.txt "$stamp" 2>/dev/null; then
  echo "[setup] installing requirements (torch pinned by constraints.txt)" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
  cp requirements.txt "$stamp"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . >/dev/null
