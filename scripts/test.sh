#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Browser tests drive Debian's chromium headless (never a browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq chromium >/dev/null
fi
# Lint and format first (ruff, configured in pyproject.toml): seconds, and a clear failure.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The fused CPU kernel must have built here: its tests compare it with the torch path and numpy.
NORMSCOPE_REQUIRE_KERNEL=1 exec .venv/bin/python -m pytest -q "$@"
