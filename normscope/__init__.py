"""normscope: model analysis and diagnostics for PyTorch training.

Public API (see DESIGN.md):

- :func:`watch` → :class:`Scope`: collect per-layer statistics while a model trains.
- :func:`load` → :class:`Run`: read a run directory back as pandas DataFrames.
- :func:`analyze` → findings; :func:`probe` → a short instrumented run of a :class:`Recipe`.
- :func:`inspect` → :class:`Inspection`: probe → fold → analyze → report, what ``normscope inspect`` runs.
- :func:`fold_bn`, :func:`export_onnx`, :func:`fold_onnx`, :func:`recalibrate_bn`: deployment.

Importing normscope stays light: no matplotlib, jinja2, typer or rich.
"""

# normscope.analyze(run, ...) and normscope.probe(recipe, ...) are callable modules: the
# packages keep their submodules (normscope.probe.Recipe) and calling them runs the function.
import normscope.analyze  # noqa: E402
import normscope.probe  # noqa: E402,F401
from normscope._version import __version__  # noqa: E402
from normscope.analyze import (  # noqa: E402
    Analysis,
    Config,
    Finding,
    Skipped,
    analyze_full,
    covariate_shift,
    list_checks,
    signal_propagation,
)
from normscope.collect import Scope, watch
from normscope.errors import NormscopeError
from normscope.fold import FoldResult, export_onnx, fold_bn, fold_onnx, recalibrate_bn
from normscope.pipeline import Inspection, inspect  # noqa: E402
from normscope.probe import Recipe, load_recipe, measure_ics, probe_model  # noqa: E402
from normscope.store import Run, load
from normscope.weightnorm import weight_norm_data_init

__all__ = [
    "Analysis",
    "Config",
    "Finding",
    "Inspection",
    "Recipe",
    "Skipped",
    "analyze",
    "analyze_full",
    "covariate_shift",
    "inspect",
    "list_checks",
    "load_recipe",
    "measure_ics",
    "probe",
    "probe_model",
    "signal_propagation",
    "FoldResult",
    "NormscopeError",
    "export_onnx",
    "fold_bn",
    "fold_onnx",
    "recalibrate_bn",
    "Run",
    "Scope",
    "load",
    "watch",
    "weight_norm_data_init",
    "__version__",
]
