"""Packages that can be called like their main function: ``normscope.analyze(run)``.

DESIGN.md names ``normscope.analyze(run, ...)`` and ``normscope.probe(recipe, ...)`` as public
functions, and ``normscope/analyze/`` and ``normscope/probe/`` are packages with submodules of
their own (``normscope.probe.Recipe``). A package module whose class gets a ``__call__`` serves
both: ``import normscope.analyze`` binds the package, and calling it runs the function.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable


def make_callable(module_name: str, func: Callable) -> None:
    """Let the module ``module_name`` be called as ``func`` (same signature and docstring)."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        @functools.wraps(func)
        def __call__(self, *args, **kwargs):
            return func(*args, **kwargs)

    CallableModule.__name__ = f"CallableModule[{func.__name__}]"
    module.__class__ = CallableModule
