"""Diagnose a recorded run: checks turn statistics into :class:`Finding` objects.

- :func:`analyze` → list of :class:`Finding` (sorted: error, warning, info; then execution order)
- :func:`analyze_full` → :class:`Analysis` (findings + skipped checks with reasons)
- :func:`list_checks` → the catalog (id, default severity, summary, doc page, thresholds)
- :class:`Config` → thresholds (defaults from CHECKS.md), ``Config.from_dict`` for TOML files
- :func:`register` → add a check; :class:`SkipCheck` → say why a check cannot run
- :mod:`~normscope.analyze.quantities`: :func:`covariate_shift`/:func:`drift`, :func:`dead_fraction`,
  :func:`signal_propagation` → the derived quantities checks, reports and exports share

Importing this package loads numpy (and pandas on first use of a run's tables); never
matplotlib, jinja2, typer or rich.
"""

from normscope.analyze.config import Config
from normscope.analyze.engine import analyze, analyze_full
from normscope.analyze.finding import SEVERITIES, Analysis, Finding, Skipped
from normscope.analyze.graph import Graph, build_graph, trace_fx, trace_hooks
from normscope.analyze.quantities import covariate_shift, dead_fraction, drift, signal_propagation
from normscope.analyze.registry import CheckInfo, SkipCheck, Thresholds, list_checks, register

__all__ = [
    "SEVERITIES",
    "Analysis",
    "CheckInfo",
    "Config",
    "Finding",
    "Graph",
    "SkipCheck",
    "Thresholds",
    "Skipped",
    "analyze",
    "analyze_full",
    "build_graph",
    "covariate_shift",
    "dead_fraction",
    "drift",
    "list_checks",
    "register",
    "signal_propagation",
    "trace_fx",
    "trace_hooks",
]


from normscope._callable import make_callable  # noqa: E402

# `normscope.analyze(run, ...)` runs analyze(); `normscope.analyze.signal_propagation` is still the package's
make_callable(__name__, analyze)
