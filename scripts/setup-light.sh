#!/usr/bin/env bash
# The light path: what `normscope inspect` needs and nothing else. Installs normscope (editable)
# with the report and CLI extras plus scikit-learn (the fixtures' datasets) into .venv-light; no
# lightning, transformers, playwright, onnx or tensorboard. PyTorch is pinned by constraints.txt.
#
#   bash scripts/setup-light.sh && .venv-light/bin/normscope inspect fixtures/dropout_before_bn.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-light}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check -c constraints.txt -e ".[report,cli]" scikit-learn
# The fused CPU reduction, compiled once for this machine (~35 s; never fails the setup: without a
# compiler the collector keeps its torch path).
"$VENV/bin/normscope" build-kernel || echo "setup: the fused CPU kernel was not built; the torch path will be used" >&2
