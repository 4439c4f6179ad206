#!/usr/bin/env bash
# Set up everything mmbench2-lab needs, from nothing but Python 3.10+, into ./.venv.
# Idempotent: re-running after a change to pyproject.toml re-installs; otherwise it returns at once.
#   bash scripts/setup.sh               # library, simulators, notebooks, app, JupyterLab, TensorBoard
#   EXTRAS=test bash scripts/setup.sh   # what the test suite needs (no JupyterLab, TensorBoard)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-all}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.mmbench2-lab-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first: with no torch present, a bare requirement would pull a multi-GB CUDA build onto CPU-only
# machines. 2.13.0 is the CPU build this project is tested with; GPU users install their CUDA torch first.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[$EXTRAS]"
# The app's browser test drives headless Chromium (Debian's package); install it where apt can.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || echo "could not install chromium: the app's browser test will skip"
fi
echo "$want" > "$stamp"
echo "mmbench2-lab is set up in $VENV"
