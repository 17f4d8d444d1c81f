"""What the framework callbacks share: open a scope, close it, analyse, summarise."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any


class CallbackOptions:
    """What both framework callbacks take: the run directory, cadence, and watch() options."""

    def __init__(self, run_dir: str | None = None, every: int = 20, analyze: bool = True, **watch_options: Any):
        self.run_dir = run_dir
        self.every = every
        self.analyze = analyze
        self.watch_options = watch_options
        self.scope = None
        self.counts: dict[str, int] | None = None


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def finish(scope, analyze: bool, failed: BaseException | None = None) -> dict[str, int] | None:
    """Close the scope (status complete/failed) and, on rank 0, count findings by severity."""
    if scope is None:
        return None
    status = "complete" if failed is None else f"failed: {type(failed).__name__}: {failed}"
    scope.close(status=status)
    if not analyze or failed is not None or not scope.is_writer:
        return None
    from normscope.analyze import analyze_full

    analysis = analyze_full(scope.run_dir)
    return analysis.counts()


def as_float(v: Any) -> float | None:
    try:
        return float(v.detach()) if hasattr(v, "detach") else float(v)
    except (TypeError, ValueError):
        return None
