"""Run directory writer: ``meta.json`` plus ``stats/<table>/part-NNNNNN.parquet``.

Every file is written to a temporary name in the same folder and renamed into place, so a
reader (or a process killed with SIGKILL) only ever sees complete files: a killed run loses at
most the rows not yet flushed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from normscope.store.parquet import encode_parquet_pieces

FORMAT = "normscope-run/1"
TABLES = ("stats", "grads", "params", "scalars", "signals")
# Runs written before 0.2 keep activation statistics under stats/layers/: still read.
LEGACY_TABLE_DIRS = {"stats": ("layers",)}

# Column types; list columns hold per-channel data and histograms.
SCHEMA: dict[str, dict[str, str]] = {
    "stats": {
        "step": "int64", "phase": "string", "layer": "string", "call": "int32", "output": "string",
        "module_type": "string", "channel_axis": "int8", "forwards": "int32", "count": "int64",
        "samples": "int64", "mean": "float64", "std": "float64", "min": "float64", "max": "float64",
        "mean_abs": "float64", "frac_zero": "float64", "frac_nonpos": "float64",
        "frac_sat": "float64", "nan_count": "int64", "inf_count": "int64",
        "ch_mean": "list<float32>", "ch_var": "list<float32>", "active": "list<int64>",
        "hist": "list<int64>", "hist_count": "int64",
    },
    "grads": {
        "step": "int64", "phase": "string", "layer": "string", "call": "int32", "output": "string",
        "count": "int64", "norm": "float64", "rms": "float64", "max_abs": "float64",
        "nan_count": "int64", "inf_count": "int64",
    },
    "params": {
        "step": "int64", "param": "string", "layer": "string", "numel": "int64",
        "requires_grad": "bool", "norm": "float64", "grad_norm": "float64",
        "update_norm": "float64", "lr": "float64", "weight_decay": "float64",
    },
    "scalars": {"step": "int64", "phase": "string", "name": "string", "value": "float64"},
    # named per-layer measurements beyond the pack (attention logits, BN running-stat drift, ...):
    # one row per step × phase × layer call × name, emitted by the collector's probes (Scope.emit)
    "signals": {"step": "int64", "phase": "string", "layer": "string", "call": "int32", "name": "string",
                "value": "float64"},
}  # fmt: skip


def _arrow_type(name: str):
    import pyarrow as pa

    if name.startswith("list<"):
        return pa.list_(_arrow_type(name[5:-1]))
    return {
        "int64": pa.int64(), "int32": pa.int32(), "int8": pa.int8(), "float64": pa.float64(),
        "float32": pa.float32(), "string": pa.string(), "bool": pa.bool_(),
    }[name]  # fmt: skip


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask (0644 under the
    usual 022): temporary files start at 0600, and the renamed file must not keep that."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


_UMASK_LOCK = threading.Lock()


def atomic_write_bytes(path: Path, data: bytes | list[bytes]) -> None:
    """Write ``data`` (bytes, or its pieces in order) to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return _json_safe(float(x))
    return x


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, json.dumps(_json_safe(obj), indent=1, sort_keys=False).encode())


class RunWriter:
    """Buffers rows column-wise and writes them as atomic Parquet parts."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.stats_dir = self.run_dir / "stats"
        for t in TABLES:
            (self.stats_dir / t).mkdir(parents=True, exist_ok=True)
        self._cols: dict[str, dict[str, list]] = {t: {c: [] for c in SCHEMA[t]} for t in TABLES}
        self._rows = {t: 0 for t in TABLES}
        self._seq = self._next_seq()
        self.parts_written = 0

    def _next_seq(self) -> int:
        seq = 0
        for t in TABLES:
            for p in (self.stats_dir / t).glob("part-*.parquet"):
                try:
                    seq = max(seq, int(p.stem.split("-")[1]))
                except (IndexError, ValueError):
                    continue
        return seq + 1

    def append(self, table: str, row: dict) -> None:
        cols = self._cols[table]
        for c, buf in cols.items():
            buf.append(row.get(c))
        self._rows[table] += 1

    def extend(self, table: str, columns: dict[str, list]) -> None:
        """Append many rows at once, given column-wise (every column of the table, equal lengths)."""
        cols = self._cols[table]
        n = len(next(iter(columns.values())))
        for c, buf in cols.items():
            v = columns.get(c)
            buf.extend(v if v is not None else [None] * n)
        self._rows[table] += n

    @property
    def pending_rows(self) -> int:
        return sum(self._rows.values())

    def flush(self) -> None:
        for t in TABLES:
            if not self._rows[t]:
                continue
            data = encode_parquet_pieces(SCHEMA[t], self._cols[t])
            path = self.stats_dir / t / f"part-{self._seq:06d}.parquet"
            atomic_write_bytes(path, data)
            self.parts_written += 1
            self._cols[t] = {c: [] for c in SCHEMA[t]}
            self._rows[t] = 0
        self._seq += 1
