"""underfitting: Train and eval loss both high (≥ 70 % of their start) and flat: the model cannot fit the data.

What it measures, why it matters and how to fix it: docs/checks/underfitting.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._fitting import _curves
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import Thresholds, register

ID = "underfitting"


@register(
    id=ID, severity="warning",
    summary="Train and eval loss both high (≥ 70 % of their start) and flat: the model cannot fit the data.",
    needs=("eval-loss", "train-loss", "training"),
    thresholds={"high_frac": 0.7, "flat_tol": 0.05, "min_points": 5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    es, ev, ts, tv = _curves(ctx, t["min_points"])

    def summary(v):
        k = max(1, len(v) // 10)
        start, end = float(np.mean(v[:k])), float(np.mean(v[-k:]))
        half = v[len(v) // 2 :]
        q = max(1, len(half) // 4)
        a, b = float(np.mean(half[:q])), float(np.mean(half[-q:]))
        return start, end, abs(a - b) / max(abs(a), 1e-12)

    t0, t1, tflat = summary(tv)
    e0, e1, eflat = summary(ev)
    high = t1 >= t["high_frac"] * t0 and e1 >= t["high_frac"] * e0
    flat = tflat <= t["flat_tol"] and eflat <= t["flat_tol"]
    if not (high and flat):
        return []
    evd = {"train_loss_start": t0, "train_loss_end": t1, "eval_loss_start": e0, "eval_loss_end": e1,
           "train_change_last_half": tflat, "eval_change_last_half": eflat, "thresholds": dict(t)}  # fmt: skip
    msg = (
        f"Train and eval loss stay high and flat ({num(t0)} → {num(t1)} train, {num(e0)} → {num(e1)} eval, under "
        f"{num(100 * max(tflat, eflat), 2)} % change over the last half): the model is underfitting."
    )
    rec = (
        "Give the model more capacity (wider/deeper, a nonlinearity where it is missing) or better features, train "
        "longer or with a higher learning rate, and reduce regularisation."
    )
    return [Finding(ID, "warning", None, (int(ts[0]), int(ts[-1])), msg, evd, rec)]
