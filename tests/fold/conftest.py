"""Shared helpers for the BN-folding tests.

``normscope/__init__`` imports the collect/store layers, built in parallel with this one. If
that import fails, the fold tests still run: a bare ``normscope`` package pointing at the source
folder is registered, so ``normscope.errors`` and ``normscope.fold`` import on their own
(``normscope.fold`` depends on nothing else in the package).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    importlib.import_module("normscope")
except ImportError:  # the rest of the package is not there yet
    for key in [k for k in sys.modules if k == "normscope" or k.startswith("normscope.")]:
        del sys.modules[key]
    pkg = types.ModuleType("normscope")
    pkg.__path__ = [str(ROOT / "normscope")]
    sys.modules["normscope"] = pkg

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
