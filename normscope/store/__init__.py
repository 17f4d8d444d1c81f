"""Run directories: writing (RunWriter, atomic Parquet parts, side files) and reading (load → Run).

This package owns every file of a run directory: meta.json, stats/<table>/part-*.parquet,
probe.json and fold.json; the other layers read and write them only through it.
"""

from pathlib import Path

from normscope.store.reader import Run, read_table, writer_state
from normscope.store.sidecars import FOLD_FILE, PROBE_FILE, read_fold, read_probe, write_fold, write_probe
from normscope.store.writer import FORMAT, SCHEMA, TABLES, RunWriter, write_json


def load(run_dir: str | Path) -> Run:
    """Open a run directory written by :func:`normscope.watch` (also while it is being written)."""
    return Run(run_dir)


__all__ = [
    "FOLD_FILE",
    "FORMAT",
    "PROBE_FILE",
    "SCHEMA",
    "TABLES",
    "Run",
    "RunWriter",
    "load",
    "read_fold",
    "read_probe",
    "read_table",
    "write_fold",
    "write_json",
    "write_probe",
    "writer_state",
]
