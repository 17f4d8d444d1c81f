"""Plain data produced by the checks: :class:`Finding`, :class:`Skipped`, :class:`Analysis`.

Renderers (terminal, JSON, JUnit, HTML) live elsewhere and only read these objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def json_safe(x: Any) -> Any:
    """Recursively convert numpy scalars/arrays, tuples and non-finite floats to JSON types."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if np is not None:
        if isinstance(x, np.bool_):
            return bool(x)
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.floating):
            return json_safe(float(x))
        if isinstance(x, np.ndarray):
            return [json_safe(v) for v in x.tolist()]
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in x]
    return str(x)


@dataclass(frozen=True, eq=True)
class Finding:
    """One diagnosis: what is wrong (``message``), where, the numbers, and the fix."""

    check: str
    severity: str  # "error" | "warning" | "info"
    layer: str | None
    step: int | tuple[int, int] | None
    message: str
    evidence: dict = field(default_factory=dict, hash=False, compare=True)
    recommendation: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def __hash__(self) -> int:
        return hash((self.check, self.severity, self.layer, self.step, self.message))

    def to_dict(self) -> dict:
        return {
            "check": self.check,
            "severity": self.severity,
            "layer": self.layer,
            "step": list(self.step) if isinstance(self.step, tuple) else self.step,
            "message": self.message,
            "evidence": json_safe(self.evidence),
            "recommendation": self.recommendation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        step = d.get("step")
        if isinstance(step, list):
            step = tuple(step)
        return cls(d["check"], d["severity"], d.get("layer"), step, d["message"], dict(d.get("evidence") or {}),
                   d.get("recommendation", ""))  # fmt: skip

    def __str__(self) -> str:
        where = f" [{self.layer}]" if self.layer else ""
        return f"{self.severity}: {self.check}{where}: {self.message}"


@dataclass(frozen=True)
class Skipped:
    """A check that could not run on this run, and why (never silent)."""

    check: str
    reason: str

    def to_dict(self) -> dict:
        return {"check": self.check, "reason": self.reason}


@dataclass
class Analysis:
    """Everything :func:`normscope.analyze.analyze_full` learned about one run."""

    findings: list[Finding]
    skipped: list[Skipped]
    checks_run: list[str]
    run_dir: str | None = None
    graph_source: str | None = None

    def by_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.by_severity("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.by_severity("warning")

    @property
    def worst(self) -> str | None:
        return min((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__, default=None)

    def counts(self) -> dict[str, int]:
        return {s: len(self.by_severity(s)) for s in SEVERITIES}

    def to_dict(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "graph_source": self.graph_source,
            "counts": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
            "skipped": [s.to_dict() for s in self.skipped],
            "checks_run": list(self.checks_run),
        }
