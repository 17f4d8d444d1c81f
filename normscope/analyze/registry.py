"""The check registry: ``@register(id=..., severity=..., summary=..., needs=..., params=...)``.

A check is a function ``check(ctx, p) -> iterable of Finding`` where ``ctx`` is the
:class:`~normscope.analyze.context.Context` (run, model, derived data) and ``p`` the check's
thresholds (defaults declared here, overridden by :class:`~normscope.analyze.config.Config`).
It raises :class:`SkipCheck` when the data it needs is not there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from normscope.analyze.finding import SEVERITIES

DOCS_DIR = "docs/checks"

# Data requirements a check may declare; the engine turns a missing one into a Skipped result.
NEEDS = ("stats", "grads", "params", "updates", "eval-loss", "train-loss", "graph", "probe-bn",
         "probe-inputs", "weights", "training")  # fmt: skip


class SkipCheck(Exception):
    """Raised by a check that cannot run: the message says what is missing."""


@dataclass(frozen=True)
class CheckSpec:
    id: str
    severity: str  # default (highest) severity the check emits
    summary: str
    needs: tuple[str, ...]
    params: dict[str, Any]
    func: Callable = field(repr=False, compare=False)

    @property
    def doc(self) -> str:
        return f"{DOCS_DIR}/{self.id}.md"


@dataclass(frozen=True)
class CheckInfo:
    """What ``list_checks()`` returns (and ``normscope checks`` prints)."""

    id: str
    severity: str
    summary: str
    doc: str
    params: dict[str, Any]
    needs: tuple[str, ...]


_REGISTRY: dict[str, CheckSpec] = {}


def register(id: str, severity: str, summary: str, needs: tuple[str, ...] | list[str] = (),
             params: dict[str, Any] | None = None):  # fmt: skip
    """Register a check function under a stable id."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}")
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"unknown needs {unknown}; known: {NEEDS}")

    def deco(func: Callable) -> Callable:
        if id in _REGISTRY and _REGISTRY[id].func is not func:
            raise ValueError(f"check id {id!r} registered twice")
        _REGISTRY[id] = CheckSpec(id, severity, summary, tuple(needs), dict(params or {}), func)
        return func

    return deco


def _load() -> None:
    import normscope.analyze.checks  # noqa: F401  (registers every built-in check)


def registry() -> dict[str, CheckSpec]:
    _load()
    return dict(_REGISTRY)


def get_check(check_id: str) -> CheckSpec:
    from normscope.errors import NormscopeError

    reg = registry()
    if check_id not in reg:
        raise NormscopeError(f"unknown check {check_id!r}: run `normscope checks` to list the ids ({', '.join(sorted(reg))}).")
    return reg[check_id]


def list_checks() -> list[CheckInfo]:
    """Every registered check: id, default severity, one-line summary, doc page, thresholds."""
    return [CheckInfo(s.id, s.severity, s.summary, s.doc, dict(s.params), s.needs)
            for s in sorted(registry().values(), key=lambda s: s.id)]  # fmt: skip
