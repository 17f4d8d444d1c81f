"""Recipes and the probe runner: model + data + loss + optimizer → a short instrumented run.

- :class:`Recipe`, :func:`load_recipe` (``path.py``, ``path.py:func``, ``module:function``)
- :func:`probe` → :class:`~normscope.store.Run` (training under ``watch`` + measurement passes)
- :func:`probe_model` → initialisation-time run from a model (or factory) and an input shape
- :func:`measure_ics` → exact internal covariate shift (Santurkar et al. 2018), opt-in

Importing this package loads torch and numpy only (pandas on first use).
"""

from normscope.probe.ics import measure_ics
from normscope.probe.recipe import Recipe, load_recipe
from normscope.probe.runner import probe, probe_model

__all__ = ["Recipe", "load_recipe", "measure_ics", "probe", "probe_model"]


# `normscope.probe(recipe)` is the public entry point (DESIGN.md) and `normscope/probe/` is this
# package: the module is callable, so `normscope.probe(recipe, steps=...)` and
# `normscope.probe.Recipe` both work once normscope/__init__.py does `import normscope.probe`.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, recipe, steps=None, run_dir=None, every=1, **kwargs):  # noqa: D102
        return probe(recipe, steps=steps, run_dir=run_dir, every=every, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
