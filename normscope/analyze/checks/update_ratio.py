"""update-ratio: Per-step ‖Δw‖/‖w‖ two decades away from ~1e-3 (median over the last half): learning rate far too low/high, or weights frozen by accident.

What it measures, why it matters and how to fix it: docs/checks/update-ratio.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import update_ratio
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import is_norm

ID = "update-ratio"


def _param_dims(ctx) -> dict[str, int]:
    if ctx.model is None:
        return {}
    return {n: p.dim() for n, p in ctx.model.named_parameters()}


def _is_vector(ctx, dims, name: str, layer: str) -> bool:
    if name in dims:
        return dims[name] <= 1
    return name.rsplit(".", 1)[-1] == "bias" or is_norm(ctx.type_of(layer or "<root>"))


@register(
    id=ID, severity="warning",
    summary="Per-step ‖Δw‖/‖w‖ two decades away from ~1e-3 (median over the last half): learning rate far too low/high, or weights frozen by accident.",
    needs=("params", "updates", "training"),
    thresholds={"low_warn": 1e-5, "high_warn": 1e-1, "low_info": 1e-4, "high_info": 1e-2, "last_frac": 0.5,
            "include_1d": False},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    par = ctx.params
    par = par[par.requires_grad & par.update_norm.notna()]
    if not len(par):
        raise SkipCheck("no trainable parameter with a recorded update")
    dims = _param_dims(ctx)
    steps = np.sort(par.step.unique())
    cut = steps[min(len(steps) - 1, int(np.floor((1 - t["last_frac"]) * len(steps))))]
    tail = par[par.step >= cut]
    med: dict[str, tuple[float, str, float]] = {}
    for name, d in tail.groupby("param", sort=False):
        layer = str(d.layer.iloc[0])
        if not t["include_1d"] and _is_vector(ctx, dims, name, layer):
            continue
        r = update_ratio(d.update_norm.to_numpy(float), d.norm.to_numpy(float))
        if np.isfinite(r).any():
            lrs = d.lr.to_numpy(float)
            lr = float(np.median(lrs[np.isfinite(lrs)])) if np.isfinite(lrs).any() else float("nan")
            med[str(name)] = (float(np.nanmedian(r)), layer, lr)
    if not med:
        raise SkipCheck("no weight tensor with a non-zero norm and a recorded update")
    groups = {
        ("warning", "low"): {k: v for k, v in med.items() if v[0] < t["low_warn"]},
        ("warning", "high"): {k: v for k, v in med.items() if v[0] > t["high_warn"]},
        ("info", "low"): {k: v for k, v in med.items() if t["low_warn"] <= v[0] < t["low_info"]},
        ("info", "high"): {k: v for k, v in med.items() if t["high_info"] < v[0] <= t["high_warn"]},
    }
    out = []
    span = (int(cut), int(steps[-1]))
    for (sev, side), sel in groups.items():
        if not sel:
            continue
        worst = min(sel, key=lambda k: sel[k][0]) if side == "low" else max(sel, key=lambda k: sel[k][0])
        r, layer, lr = sel[worst]
        frozen = [k for k, v in sel.items() if v[0] == 0.0]
        not_in_opt = [k for k, v in sel.items() if not np.isfinite(v[2])]
        decades = "two decades" if sev == "warning" else "a decade"
        msg = (f"{len(sel)} weight tensor(s) change by a median ‖Δw‖/‖w‖ of {num(r)} per step over steps "
               f"{span[0]}–{span[1]} (e.g. {worst}), {decades} {'below' if side == 'low' else 'above'} the ~1e-3 that "
               f"is healthy for SGD.")  # fmt: skip
        if frozen:
            msg = (
                msg[:-1]
                + f"; {len(frozen)} did not move at all"
                + (" and are in no optimizer param group." if not_in_opt else ".")
            )
        if side == "low":
            rec = (
                "Raise the learning rate (or check the scheduler), and check that these parameters are in the "
                "optimizer and not frozen by accident (requires_grad, param groups). CS231n: updates of about "
                "1e-3 of the weight scale are healthy for SGD; Adam at lr 1e-3 sits near 1e-2 early on."
            )
        else:
            rec = (
                "Lower the learning rate or add warmup: each step moves these weights by a large fraction of their "
                "size, which destabilises training (CS231n: ~1e-3 is healthy for SGD)."
            )
        ev = {"params": {k: {"median_ratio": v[0], "layer": v[1], "lr": v[2]} for k, v in sel.items()},
              "frozen": frozen, "not_in_optimizer": not_in_opt, "window_steps": list(span), "thresholds": dict(t)}  # fmt: skip
        out.append(Finding(ID, sev, layer or None, span, msg, ev, rec))
    return out
