"""overfitting: Eval loss rising while train loss falls (widening gap): the model memorises the training set.

What it measures, why it matters and how to fix it: docs/checks/overfitting.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._fitting import _at, _curves
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import Thresholds, register

ID = "overfitting"


@register(
    id=ID, severity="warning",
    summary="Eval loss rising while train loss falls (widening gap): the model memorises the training set.",
    needs=("eval-loss", "train-loss", "training"),
    thresholds={"rise": 0.1, "train_drop": 0.05, "min_points": 5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    es, ev, ts, tv = _curves(ctx, t["min_points"])
    n = len(ev)
    tail = max(1, n // 10)
    e_end = float(np.mean(ev[-tail:]))
    i_min = int(np.argmin(ev))
    e_min = float(ev[i_min])
    best = int(es[i_min])
    if i_min >= n - tail:
        return []
    t_best, t_end = _at(ts, tv, best), float(tv[-1])
    rose = e_end - e_min >= t["rise"] * max(abs(e_min), 1e-12)
    train_fell = t_end <= t_best * (1 - t["train_drop"])
    if not (rose and train_fell):
        return []
    evd = {"best_step": best, "eval_loss_min": e_min, "eval_loss_end": e_end, "train_loss_at_best": t_best,
           "train_loss_end": t_end, "gap_at_best": e_min - t_best, "gap_end": e_end - t_end,
           "eval_points": n, "thresholds": dict(t)}  # fmt: skip
    msg = (
        f"The eval loss bottomed out at {num(e_min)} at step {best} and rose to {num(e_end)} by the end, while the "
        f"train loss kept falling ({num(t_best)} → {num(t_end)}): the model is overfitting."
    )
    rec = (
        f"Stop near step {best}, where the eval loss was lowest (early stopping acts like L2 regularisation), add "
        "data or augmentation, add L2 weight decay or dropout, or use a smaller model."
    )
    return [Finding(ID, "warning", None, (best, int(es[-1])), msg, evd, rec)]
