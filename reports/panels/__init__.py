"""Diagnostic panels: one plot per check that has something to show over training.

Each module in this package defines ``panels(run, findings, F) -> list[dict]``, where
``findings`` are the report's finding dicts and ``F`` is :mod:`normscope_reports.figures`.
A panel is ``{"check": id, "title": str, "src": data URI, "hover": dict, "note": str}``; a
module returns ``[]`` when the run has nothing for it (no such layers, signal not recorded).
Modules are discovered by name (sorted), so adding a panel touches only its own file. A panel
that fails is reported in the page's "Not shown" list, never as a broken report.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def panel_modules() -> list[Any]:
    mods = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"{__name__}.{info.name}"))
    return mods


def threshold(findings: list[dict], check: str, key: str) -> float:
    """A check's threshold as the run was judged: from its finding's evidence (a user's config is
    in there), else the check's default."""
    for f in findings:
        if f.get("check") == check:
            v = ((f.get("evidence") or {}).get("thresholds") or {}).get(key)
            if isinstance(v, (int, float)):
                return float(v)
    from normscope.analyze.config import Config

    return float(Config().thresholds(check)[key])


def build_panels(run, findings: list[dict], F) -> tuple[list[dict], list[str]]:
    """All panels for ``run`` (module order), and a line per panel module that failed."""
    out, failed = [], []
    for mod in panel_modules():
        try:
            out += mod.panels(run, findings, F)
        except Exception as e:  # noqa: BLE001 - one failing plot must not cost the report
            failed.append(f"{mod.__name__.rsplit('.', 1)[-1]} panel: {type(e).__name__}: {e}")
    return out, failed
