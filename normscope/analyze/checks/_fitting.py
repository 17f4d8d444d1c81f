"""Loss curves shared by overfitting and underfitting."""

from __future__ import annotations

import numpy as np

from normscope.analyze.registry import SkipCheck


def _smooth(v: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or v.size < 3:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(v.size):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _at(steps: np.ndarray, values: np.ndarray, step: int) -> float:
    i = int(np.searchsorted(steps, step, side="right")) - 1
    return float(values[max(i, 0)])


def _curves(ctx, min_points: int):
    ev = ctx.loss_series("eval")
    tr = ctx.loss_series("train")
    if len(ev) < min_points:
        raise SkipCheck(
            f"fewer than {min_points} eval-loss points (give the recipe eval_data, or log phase='eval' losses)"
        )
    if len(tr) < min_points:
        raise SkipCheck(f"fewer than {min_points} train-loss points")
    ts, tv = tr.step.to_numpy(), tr.value.to_numpy(float)
    return ev.step.to_numpy(), ev.value.to_numpy(float), ts, _smooth(tv, max(1, len(tv) // 20))
