"""The check registry: one module per check, registered with ``@register``.

A check is a function ``check(ctx: Context, t: Thresholds) -> list[Finding]`` in its own module
``normscope/analyze/checks/<id with _>.py``, decorated with::

    @register(id="dead-units", severity="error", summary="...", needs=("stats",),
              thresholds={"warn": 0.10, "error": 0.40})

- ``needs`` is the only gate: the engine checks each declared need (see :data:`NEEDS`) before
  calling the check, and turns a missing one into a :class:`~normscope.analyze.finding.Skipped`
  with the reason. Inside, a check may still raise :class:`SkipCheck` for what only its own data
  can tell (no BatchNorm layer in the model, too few samples to judge).
- ``thresholds`` are the defaults (from CHECKS.md); :class:`~normscope.analyze.config.Config`
  overrides them and the check receives them as :class:`Thresholds` (``t.warn`` or ``t["warn"]``).

Every module of the ``checks`` package is imported on first use of the registry, so adding a
check is adding its module (and its ``docs/checks/<id>.md`` page and fixture); nothing else lists
checks. Registration is reload-safe: re-running a module (``importlib.reload``) replaces its
checks, while a second module claiming a taken id is an error.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from normscope.analyze.finding import SEVERITIES

DOCS_DIR = "docs/checks"

# What a check may declare it needs; the engine (engine.missing) says why a need is not met.
NEEDS: dict[str, str] = {
    "stats": "activation statistics (train rows, or eval rows of an inference-only run)",
    "standard-stats": "the standard statistic set (fractions, activity, histograms; not recorded under stats='minimal')",
    "grads": "gradient statistics w.r.t. hooked outputs",
    "params": "parameter statistics (norms per step)",
    "updates": "recorded parameter updates ‖Δw‖",
    "eval-loss": "an eval loss series",
    "train-loss": "a train loss series",
    "graph": "the module graph (fx, the probe, or the execution order)",
    "probe-bn": "BatchNorm running vs population statistics (measured by normscope.probe)",
    "probe-inputs": "the input features' statistics (measured by normscope.probe)",
    "weights": "the weights (model= given to analyze, or the probe's measurement)",
    "training": "a run that trained (not a model-only probe on synthetic data)",
    "modes": "the collector's train/eval mode audit (meta.json 'modes', recorded since normscope 0.2)",
}


class SkipCheck(Exception):
    """Raised by a check that cannot run: the message says what is missing."""


class Thresholds(Mapping):
    """A check's thresholds, read-only: ``t.warn`` or ``t["warn"]``."""

    __slots__ = ("_values", "_check")

    def __init__(self, values: Mapping[str, Any], check: str = ""):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_check", check)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"check {self._check!r} has no threshold {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError("thresholds are read-only: set them through normscope.Config")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Thresholds({self._values!r})"


@dataclass(frozen=True)
class CheckSpec:
    id: str
    severity: str  # default (highest) severity the check emits
    summary: str
    needs: tuple[str, ...]
    thresholds: dict[str, Any]
    func: Callable = field(repr=False, compare=False)

    @property
    def doc(self) -> str:
        return f"{DOCS_DIR}/{self.id}.md"

    @property
    def module(self) -> str:
        return self.func.__module__


@dataclass(frozen=True)
class CheckInfo:
    """What ``list_checks()`` returns (and ``normscope checks`` prints)."""

    id: str
    severity: str
    summary: str
    doc: str
    thresholds: dict[str, Any]
    needs: tuple[str, ...]


_REGISTRY: dict[str, CheckSpec] = {}
_LOADED = False


def register(id: str, severity: str, summary: str, needs: tuple[str, ...] | list[str] = (),
             thresholds: Mapping[str, Any] | None = None):  # fmt: skip
    """Register ``check(ctx, t)`` under a stable id (see the module docstring)."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}")
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"unknown needs {unknown}; known: {list(NEEDS)}")

    def deco(func: Callable) -> Callable:
        old = _REGISTRY.get(id)
        if old is not None and (old.func.__module__, old.func.__qualname__) != (func.__module__, func.__qualname__):
            raise ValueError(f"check id {id!r} registered twice ({old.func.__module__} and {func.__module__})")
        _REGISTRY[id] = CheckSpec(id, severity, summary, tuple(needs), dict(thresholds or {}), func)
        return func

    return deco


def _load() -> None:
    """Import every module of normscope.analyze.checks (each registers its check)."""
    global _LOADED
    if _LOADED:
        return
    import normscope.analyze.checks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _LOADED = True


def registry() -> dict[str, CheckSpec]:
    _load()
    return dict(_REGISTRY)


def get_check(check_id: str) -> CheckSpec:
    from normscope.errors import NormscopeError

    reg = registry()
    if check_id not in reg:
        raise NormscopeError(
            f"unknown check {check_id!r}: run `normscope checks` to list the ids ({', '.join(sorted(reg))})."
        )
    return reg[check_id]


def list_checks() -> list[CheckInfo]:
    """The catalog, derived from the registry: id, default severity, summary, doc page, thresholds."""
    return [CheckInfo(s.id, s.severity, s.summary, s.doc, dict(s.thresholds), s.needs)
            for s in sorted(registry().values(), key=lambda s: s.id)]  # fmt: skip
