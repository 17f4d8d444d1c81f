"""effective-lr: Effective learning rate η/‖w‖² of weights followed by a normaliser (scale-invariant): it drifts as ‖w‖ grows or shrinks.

What it measures, why it matters and how to fix it: docs/checks/effective-lr.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import finite_median, num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import effective_lr
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM, INSTANCENORM, LINEAR_LIKE, NORM_TYPES

ID = "effective-lr"


def scale_invariant_weights(ctx, g) -> list[str]:
    """Weights of conv/linear layers whose only consumer is a normaliser that cancels their scale."""
    out = []
    for n in g.module_nodes():
        if ctx.node_type(n) not in LINEAR_LIKE:
            continue
        cons = g.consumers(n.id)
        if len(cons) != 1 or cons[0].op != "module":
            continue
        ct = ctx.node_type(cons[0])
        has_bias = ctx.modules.get(n.module, {}).get("bias", True)
        if ct in BATCHNORM | INSTANCENORM or (ct in NORM_TYPES and not has_bias):
            w = f"{n.module}.weight" if n.module != "<root>" else "weight"
            if w not in out:
                out.append(w)
    return out


@register(
    id=ID, severity="info",
    summary="Effective learning rate η/‖w‖² of weights followed by a normaliser (scale-invariant): it drifts as ‖w‖ grows or shrinks.",
    needs=("params", "graph", "training"),
    thresholds={"change": 2.0},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    g = ctx.graph  # the "graph" need guarantees it
    weights = scale_invariant_weights(ctx, g)
    if not weights:
        raise SkipCheck("no weight feeds a normalisation layer directly (no scale-invariant weight)")
    par = ctx.params
    par = par[par.param.isin(weights)]
    if not len(par) or par.lr.isna().all():
        raise SkipCheck("no learning rate recorded for the scale-invariant weights (no optimizer seen)")
    series, changes = {}, []
    for name, d in par.sort_values("step").groupby("param", sort=False):
        e = effective_lr(d.lr.to_numpy(float), d.norm.to_numpy(float))
        ok = np.isfinite(e)
        if ok.sum() < 2:
            continue
        e, st, lr = e[ok], d.step.to_numpy()[ok], d.lr.to_numpy(float)[ok]
        k = max(1, len(e) // 20)
        start, end = float(np.mean(e[:k])), float(np.mean(e[-k:]))
        ratio = end / start if start > 0 else float("nan")
        lr0 = float(np.mean(lr[:k]))
        by_lr = float(np.mean(lr[-k:])) / lr0 if lr0 > 0 else float("nan")  # the schedule's share of the change
        series[str(name)] = {"start": start, "end": end, "ratio": ratio, "lr_change": by_lr,
                             "norm_change": ratio / by_lr if by_lr > 0 else float("nan"),
                             "norm_start": float(d.norm.iloc[0]), "norm_end": float(d.norm.iloc[-1]),
                             "steps": st[:: max(1, len(st) // 50)].tolist(),
                             "effective_lr": e[:: max(1, len(e) // 50)].tolist()}  # fmt: skip
        changes.append((str(name), series[str(name)]["ratio"]))
    if not series:
        raise SkipCheck("fewer than two recorded steps for the scale-invariant weights")
    ratios = np.array([r for _, r in changes], dtype=float)
    med = float(np.nanmedian(ratios))
    moved = [n for n, r in changes if np.isfinite(r) and (r > t["change"] or r < 1 / t["change"])]
    worst = max(changes, key=lambda c: abs(np.log(c[1])) if np.isfinite(c[1]) and c[1] > 0 else 0)
    by_lr = finite_median([s["lr_change"] for s in series.values()])
    by_norm = finite_median([s["norm_change"] for s in series.values()])
    split = (
        f"; the learning-rate schedule accounts for ×{num(by_lr)} of it, the weights' norm for ×{num(by_norm)}"
        if np.isfinite(by_lr) and abs(np.log(by_lr)) > np.log(1.01) and np.isfinite(by_norm)
        else ""
    )
    msg = (
        f"{len(series)} weight(s) feed a normaliser, so only their direction matters and the effective step is "
        f"η/‖w‖²: it changed by a median ×{num(med)} over the run"
        + (f" ({len(moved)} by more than ×{num(t['change'])}, most {worst[0]}: ×{num(worst[1])})" if moved else "")
        + split
        + "."
    )
    rec = (
        "A measurement: for scale-invariant weights, L(αw) = L(w) and ∇L(αw) = ∇L(w)/α, so as ‖w‖ grows without "
        "weight decay training silently slows (van Laarhoven 2017; Hoffer et al. 2018). Weight decay on these "
        "weights, or a schedule that accounts for it, keeps the effective step steady."
    )
    layer = worst[0].rsplit(".", 1)[0] if "." in worst[0] else "<root>"
    ev = {"weights": series, "median_change": med, "median_lr_change": by_lr, "median_norm_change": by_norm,
          "graph": g.source}  # fmt: skip
    return [Finding(ID, "info", layer, None, msg, ev, rec)]
