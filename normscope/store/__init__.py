"""Run directories: writing (RunWriter, atomic Parquet parts) and reading (load → Run)."""

from pathlib import Path

from normscope.store.reader import Run, read_table
from normscope.store.writer import FORMAT, SCHEMA, TABLES, RunWriter, write_json


def load(run_dir: str | Path) -> Run:
    """Open a run directory written by :func:`normscope.watch` (also while it is being written)."""
    return Run(run_dir)


__all__ = ["FORMAT", "SCHEMA", "TABLES", "Run", "RunWriter", "load", "read_table", "write_json"]
