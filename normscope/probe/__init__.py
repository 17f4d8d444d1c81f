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


from normscope._callable import make_callable  # noqa: E402

# `normscope.probe(recipe, steps=...)` runs probe(); `normscope.probe.Recipe` is still the package's
make_callable(__name__, probe)
