"""dropout-bn-variance-shift: Dropout upstream of a BatchNorm (no normalisation in between): BN's running variance is learned with dropout on and is wrong at test time (Li et al. 2019).

What it measures, why it matters and how to fix it: docs/checks/dropout-bn-variance-shift.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._bn import _pass, bn_nodes, dropouts_upstream
from normscope.analyze.checks._util import num, stack
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import (
    input_moments_from_dropout_output,
    shift_factor,
    variance_shift_closed_form,
)
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "dropout-bn-variance-shift"


@register(
    id=ID, severity="warning",
    summary="Dropout upstream of a BatchNorm (no normalisation in between): BN's running variance is learned with dropout on and is wrong at test time (Li et al. 2019).",
    needs=("graph",),
    thresholds={"warn": 1.1},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    g = ctx.graph  # the "graph" need guarantees it
    bns = bn_nodes(ctx, g)
    if not bns:
        raise SkipCheck("no BatchNorm layer in the model")
    probe_bn = ctx.probe.get("bn") or {}
    out = []
    seen = set()
    for bn in bns:
        if bn.module in seen:
            continue
        drops = dropouts_upstream(ctx, g, bn)
        if not drops:
            continue
        seen.add(bn.module)
        name, p_drop, direct = max(drops, key=lambda d: (d[2], d[1]))
        retain = 1.0 - p_drop
        ev = {"dropouts": [{"module": n, "p": pd, "direct": dr} for n, pd, dr in drops], "bn": bn.module,
              "graph": g.source, "retain_probability": retain, "threshold": t["warn"]}  # fmt: skip
        measured = None
        b = probe_bn.get(bn.module)
        if b and b.get("running_var") is not None and _pass(b, "train/eval") is not None:
            rv = np.asarray(b["running_var"], dtype=np.float64)
            _, v_eval = _pass(b, "train/eval")
            ok = (rv > 1e-12) & (v_eval > 1e-12)
            if ok.any():
                r = float(np.median(v_eval[ok] / rv[ok]))
                measured = float(shift_factor(r))
                ev.update(measured_shift=measured, var_ratio_eval_over_running=r, channels=int(ok.sum()))
            drop = _pass(b, "train/drop")
            if drop is not None:
                okd = ok & (drop[1] > 1e-12)
                if okd.any():
                    ev["var_ratio_eval_over_train_dropout"] = float(np.median(v_eval[okd] / drop[1][okd]))
        predicted = None
        if direct:
            d = ctx.layer_series(name, 0)
            if len(d):
                w = max(1, len(d) // 10)
                c = np.nanmean(stack(d.ch_mean)[-w:], axis=0)
                vv = np.nanmean(stack(d.ch_var)[-w:], axis=0)
                c, v_in = input_moments_from_dropout_output(c, vv, retain)
                ok = (v_in > 1e-12) & np.isfinite(v_in)
                if ok.any():
                    delta = float(np.median(variance_shift_closed_form(retain, c[ok], v_in[ok])))
                    predicted = float(shift_factor(delta))
                    ev.update(predicted_delta=delta, predicted_shift=predicted)
        if measured is None and predicted is None:
            predicted = float(shift_factor(retain))  # Δ = q when the input has zero mean
            ev.update(predicted_delta=retain, predicted_shift=predicted, prediction="zero-mean input (Δ = q)")
        shift = measured if measured is not None else predicted
        sev = "warning" if shift > t["warn"] else "info"
        how = "measured" if measured is not None else "predicted"
        msg = (f"{name} (dropout p={num(p_drop)}) feeds {bn.module} with no normalisation in between, so BN's running "
               f"variance is learned with dropout on: at test time the variance it normalises is off by ×{num(shift)} "
               f"({how}).")  # fmt: skip
        rec = (
            "Move dropout after the last BatchNorm (e.g. only before the classifier), lower its rate, use a "
            "variance-stable dropout (Uout: x·(1+r), r ~ U(−β, β), Δ = 3/(3+β²)), or re-estimate the BN statistics "
            "with dropout off before evaluating (normscope.recalibrate_bn). Li et al. 2019: with retain "
            "probability q, Var_test/Var_train = v/((c²+v)/q − c²)."
        )
        out.append(Finding(ID, sev, bn.module, None, msg, ev, rec))
    return out
