"""normscope: model analysis and diagnostics for PyTorch training.

Public API (see DESIGN.md):

- :func:`watch` → :class:`Scope`: collect per-layer statistics while a model trains.
- :func:`load` → :class:`Run`: read a run directory back as pandas DataFrames.
- :func:`fold_bn`, :func:`export_onnx`, :func:`fold_onnx`, :func:`recalibrate_bn`: deployment.

Importing normscope stays light: no matplotlib, jinja2, typer or rich.
"""

from normscope.errors import NormscopeError
from normscope.collect import Scope, watch
from normscope.store import Run, load
from normscope.fold import FoldResult, export_onnx, fold_bn, fold_onnx, recalibrate_bn

__version__ = "0.1.0"

__all__ = [
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
    "__version__",
]
