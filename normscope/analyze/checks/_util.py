"""Small formatting helpers shared by the checks."""

from __future__ import annotations

import math

import numpy as np


def num(x, digits: int = 3) -> str:
    """A number for a message: 0.0123 → '0.0123', 12345 → '1.23e+04', nan → 'n/a'."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return "n/a" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


def pct(x) -> str:
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.0f} %" if x >= 0.01 or x == 0 else f"{100 * x:.2g} %"


def finite_median(x) -> float:
    """Median of the finite values; NaN, quietly (no numpy warning), where there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def stack(col) -> np.ndarray:
    """Stack a column of equal-length arrays into a 2-D float64 array."""
    vals = [np.asarray(v, dtype=np.float64) for v in col]
    if not vals:
        return np.zeros((0, 0))
    n = max(v.size for v in vals)
    return np.stack([v if v.size == n else np.full(n, np.nan) for v in vals])


def steps_span(steps) -> str:
    steps = list(steps)
    if not steps:
        return "no step"
    return f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]}–{steps[-1]}"
