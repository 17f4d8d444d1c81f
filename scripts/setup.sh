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
# The fused CPU reduction (normscope/collect/fused.cpp), compiled once for this machine and cached
# (~35 s); without a compiler the collector keeps its torch path, so this never fails the setup.
.venv/bin/normscope build-kernel || echo "setup: the fused CPU kernel was not built; the torch path will be used" >&2
