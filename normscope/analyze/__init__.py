"""Diagnose a recorded run: checks turn statistics into :class:`Finding` objects.

- :func:`analyze` → list of :class:`Finding` (sorted: error, warning, info; then execution order)
- :func:`analyze_full` → :class:`Analysis` (findings + skipped checks with reasons)
- :func:`list_checks` → the catalog (id, default severity, summary, doc page, thresholds)
- :class:`Config` → thresholds (defaults from CHECKS.md), ``Config.from_dict`` for TOML files
- :func:`register` → add a check; :class:`SkipCheck` → say why a check cannot run
- :func:`signal_propagation`, :func:`covariate_shift` → per-layer series for reports

Importing this package loads numpy (and pandas on first use of a run's tables); never
matplotlib, jinja2, typer or rich.
"""

from normscope.analyze.config import Config
from normscope.analyze.engine import analyze, analyze_full
from normscope.analyze.finding import SEVERITIES, Analysis, Finding, Skipped
from normscope.analyze.graph import Graph, build_graph, trace_fx, trace_hooks
from normscope.analyze.registry import CheckInfo, SkipCheck, list_checks, register
from normscope.analyze.series import covariate_shift, signal_propagation

__all__ = [
    "SEVERITIES",
    "Analysis",
    "CheckInfo",
    "Config",
    "Finding",
    "Graph",
    "SkipCheck",
    "Skipped",
    "analyze",
    "analyze_full",
    "build_graph",
    "covariate_shift",
    "list_checks",
    "register",
    "signal_propagation",
    "trace_fx",
    "trace_hooks",
]


# `normscope.analyze(run)` is the public entry point (DESIGN.md) and `normscope/analyze/` is this
# package: making the module itself callable lets both `normscope.analyze(run, ...)` and
# `normscope.analyze.signal_propagation(run)` work once normscope/__init__.py does
# `import normscope.analyze` (a `from normscope.analyze import analyze` there would shadow the package).
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, run, model=None, config=None, **kwargs):
        return analyze(run, model=model, config=config, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
