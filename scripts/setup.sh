#!/usr/bin/env bash
# Set up a virtual environment in .venv with normscope (editable) and everything the
# tests, report and CLI need. PyTorch is pinned by constraints.txt to the CPU build
# this machine kind carries; the library itself only requires torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e ".[all,test]"
