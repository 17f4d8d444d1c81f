"""The run directory's JSON side files, owned here like the rest of the run directory.

- ``probe.json``: what :func:`normscope.probe` measures with extra passes (module graph, module
  attributes, optimizer groups, input statistics, BN running vs population statistics, the
  train/eval output gap, weight sparsity, signal-propagation data);
- ``fold.json``: the BN-folding result of ``normscope inspect`` for models with BatchNorm
  (``FoldResult.to_dict()``).

Writers are atomic (temporary file + rename); readers return None when the file is absent and
raise a one-line :class:`~normscope.errors.NormscopeError` when it is corrupt.
"""

from __future__ import annotations

import json
from pathlib import Path

from normscope.errors import NormscopeError
from normscope.store.writer import write_json

PROBE_FILE = "probe.json"
PROBE_FORMAT = "normscope-probe/1"
FOLD_FILE = "fold.json"
FOLD_FORMAT = "normscope-fold/1"


def _read(path: Path, fmt: str, what: str, fix: str, untagged_ok: bool = False) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormscopeError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it or {fix}.") from None
    # fold.json files written before the format tag was added are plain FoldResult dicts
    tag = data.get("format", fmt if untagged_ok else None) if isinstance(data, dict) else None
    if tag != fmt:
        raise NormscopeError(f"{path} is not a normscope {what} file ({fmt}); delete it or {fix}.")
    return data


def read_probe(run_dir) -> dict | None:
    return _read(Path(run_dir) / PROBE_FILE, PROBE_FORMAT, "probe", "re-run the probe")


def write_probe(run_dir, data: dict) -> Path:
    path = Path(run_dir) / PROBE_FILE
    write_json(path, dict(data, format=PROBE_FORMAT))
    return path


def read_fold(run_dir) -> dict | None:
    return _read(Path(run_dir) / FOLD_FILE, FOLD_FORMAT, "fold", "re-run normscope inspect", untagged_ok=True)


def write_fold(run_dir, data: dict) -> Path:
    path = Path(run_dir) / FOLD_FILE
    write_json(path, dict(data, format=FOLD_FORMAT))
    return path
