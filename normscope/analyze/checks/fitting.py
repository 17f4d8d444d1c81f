"""overfitting / underfitting: train and eval loss curves (needs eval batches).

Overfitting: the eval loss rose ≥ 10 % above its minimum while the train loss kept falling (the
gap widens); the minimum is where early stopping would have stopped. Underfitting: both losses
still ≥ 70 % of where they started and flat over the last half of the run.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, register

OF_ID = "overfitting"
UF_ID = "underfitting"


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
        raise SkipCheck(f"fewer than {min_points} eval-loss points (give the recipe eval_data, or log phase='eval' losses)")
    if len(tr) < min_points:
        raise SkipCheck(f"fewer than {min_points} train-loss points")
    ts, tv = tr.step.to_numpy(), tr.value.to_numpy(float)
    return ev.step.to_numpy(), ev.value.to_numpy(float), ts, _smooth(tv, max(1, len(tv) // 20))


@register(
    id=OF_ID, severity="warning",
    summary="Eval loss rising while train loss falls (widening gap): the model memorises the training set.",
    needs=("eval-loss", "train-loss", "training"),
    params={"rise": 0.1, "train_drop": 0.05, "min_points": 5},
)  # fmt: skip
def overfitting(ctx, p):
    es, ev, ts, tv = _curves(ctx, p["min_points"])
    n = len(ev)
    tail = max(1, n // 10)
    e_end = float(np.mean(ev[-tail:]))
    i_min = int(np.argmin(ev))
    e_min = float(ev[i_min])
    best = int(es[i_min])
    if i_min >= n - tail:
        return []
    t_best, t_end = _at(ts, tv, best), float(tv[-1])
    rose = e_end - e_min >= p["rise"] * max(abs(e_min), 1e-12)
    train_fell = t_end <= t_best * (1 - p["train_drop"])
    if not (rose and train_fell):
        return []
    evd = {"best_step": best, "eval_loss_min": e_min, "eval_loss_end": e_end, "train_loss_at_best": t_best,
           "train_loss_end": t_end, "gap_at_best": e_min - t_best, "gap_end": e_end - t_end,
           "eval_points": n, "thresholds": dict(p)}  # fmt: skip
    msg = (f"The eval loss bottomed out at {num(e_min)} at step {best} and rose to {num(e_end)} by the end, while the "
           f"train loss kept falling ({num(t_best)} → {num(t_end)}): the model is overfitting.")
    rec = (f"Stop near step {best}, where the eval loss was lowest (early stopping acts like L2 regularisation), add "
           "data or augmentation, add L2 weight decay or dropout, or use a smaller model.")
    return [Finding(OF_ID, "warning", None, (best, int(es[-1])), msg, evd, rec)]


@register(
    id=UF_ID, severity="warning",
    summary="Train and eval loss both high (≥ 70 % of their start) and flat: the model cannot fit the data.",
    needs=("eval-loss", "train-loss", "training"),
    params={"high_frac": 0.7, "flat_tol": 0.05, "min_points": 5},
)  # fmt: skip
def underfitting(ctx, p):
    es, ev, ts, tv = _curves(ctx, p["min_points"])

    def summary(v):
        k = max(1, len(v) // 10)
        start, end = float(np.mean(v[:k])), float(np.mean(v[-k:]))
        half = v[len(v) // 2 :]
        q = max(1, len(half) // 4)
        a, b = float(np.mean(half[:q])), float(np.mean(half[-q:]))
        return start, end, abs(a - b) / max(abs(a), 1e-12)

    t0, t1, tflat = summary(tv)
    e0, e1, eflat = summary(ev)
    high = t1 >= p["high_frac"] * t0 and e1 >= p["high_frac"] * e0
    flat = tflat <= p["flat_tol"] and eflat <= p["flat_tol"]
    if not (high and flat):
        return []
    evd = {"train_loss_start": t0, "train_loss_end": t1, "eval_loss_start": e0, "eval_loss_end": e1,
           "train_change_last_half": tflat, "eval_change_last_half": eflat, "thresholds": dict(p)}  # fmt: skip
    msg = (f"Train and eval loss stay high and flat ({num(t0)} → {num(t1)} train, {num(e0)} → {num(e1)} eval, under "
           f"{num(100 * max(tflat, eflat), 2)} % change over the last half): the model is underfitting.")
    rec = ("Give the model more capacity (wider/deeper, a nonlinearity where it is missing) or better features, train "
           "longer or with a higher learning rate, and reduce regularisation.")
    return [Finding(UF_ID, "warning", None, (int(ts[0]), int(ts[-1])), msg, evd, rec)]
