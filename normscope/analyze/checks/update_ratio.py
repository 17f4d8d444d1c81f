"""update-ratio: per-step ‖Δw‖/‖w‖ against the healthy size for the optimizer used; weights initialised at zero judged by their absolute updates.

What it measures, why it matters and how to fix it: docs/checks/update-ratio.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._gradflow import near_zero_init
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


def optimizer_band(ctx, t) -> tuple[str, float, str]:
    """(optimizer family, healthy centre of ‖Δw‖/‖w‖, why) for the optimizer the run used.

    SGD: ~1e-3 (CS231n); with momentum μ the step is lr/(1 − μ) × the gradient, so the centre moves
    up by 1/(1 − μ); Adam-family optimizers step each element by about lr whatever the gradient's
    scale, so ‖Δw‖/‖w‖ ≈ lr / RMS(w), ~1e-2 at lr 1e-3 for weights of RMS 0.02-0.1.
    """
    opt = ctx.meta.get("optimizer") or (ctx.probe.get("optimizer") or {})
    name = str(opt.get("type") or "")
    low = name.lower()
    if any(k in low for k in ("adam", "lamb", "lion", "adafactor", "rmsprop", "adagrad", "adadelta", "nadam", "radam")):
        return name, t["adam_center"], f"{name} steps each weight by about its learning rate"
    mom = opt.get("momentum") or 0.0
    try:
        mom = float(mom)
    except (TypeError, ValueError):
        mom = 0.0
    if name and mom > 0:
        c = t["sgd_center"] / max(1.0 - mom, 1e-3)
        return (
            f"{name} (momentum {mom:g})",
            c,
            f"momentum {mom:g} multiplies SGD's step by 1/(1 − μ) = {1 / (1 - mom):.3g}",
        )
    return (name or "no optimizer recorded (SGD assumed)"), t["sgd_center"], "CS231n: ~1e-3 is healthy for SGD"


@register(
    id=ID, severity="warning",
    summary="Per-step ‖Δw‖/‖w‖ two decades away from the healthy size for the optimizer used (SGD ~1e-3, momentum ~1e-3/(1−μ), Adam ~1e-2): learning rate far off, or weights frozen.",
    needs=("params", "updates", "training"),
    thresholds={"low_warn": 1e-2, "high_warn": 1e2, "low_info": 1e-1, "high_info": 1e1, "sgd_center": 1e-3,
                "adam_center": 1e-2, "last_frac": 0.5, "include_1d": False},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    par = ctx.params
    par = par[par.requires_grad & par.update_norm.notna()]
    if not len(par):
        raise SkipCheck("no trainable parameter with a recorded update")
    dims = _param_dims(ctx)
    zero = near_zero_init(ctx)
    family, center, why = optimizer_band(ctx, t)
    adam = center == t["adam_center"] and "SGD" not in family
    potential: dict[str, float] = {}
    steps = np.sort(par.step.unique())
    cut = steps[min(len(steps) - 1, int(np.floor((1 - t["last_frac"]) * len(steps))))]
    tail = par[par.step >= cut]
    med: dict[str, tuple[float, str, float]] = {}
    near_zero: dict[str, dict] = {}
    for name, d in tail.groupby("param", sort=False):
        layer = str(d.layer.iloc[0])
        if not t["include_1d"] and _is_vector(ctx, dims, name, layer):
            continue
        lrs = d.lr.to_numpy(float)
        lr = float(np.median(lrs[np.isfinite(lrs)])) if np.isfinite(lrs).any() else float("nan")
        if name in zero:
            # a weight that starts at (or near) zero: its ratio to its own norm means nothing; judge the
            # absolute size of its updates (zero: frozen)
            upd = d.update_norm.to_numpy(float) / np.sqrt(max(float(d.numel.iloc[0]), 1.0))
            near_zero[str(name)] = {"update_rms": float(np.median(upd)), "layer": layer, "lr": lr}
            if float(np.max(upd)) == 0.0:
                med[str(name)] = (0.0, layer, lr)
            continue
        r = update_ratio(d.update_norm.to_numpy(float), d.norm.to_numpy(float))
        if np.isfinite(r).any():
            med[str(name)] = (float(np.nanmedian(r)), layer, lr)
            if adam and np.isfinite(lr) and med[str(name)][0] > 0:
                # Adam's step per element is about lr whatever the gradient: the size it can take, lr/RMS(w),
                # says whether lr is too low; the actual ratio is smaller when gradients are noise
                rms_w = np.nanmedian(d.norm.to_numpy(float)) / np.sqrt(max(float(d.numel.iloc[0]), 1.0))
                potential[str(name)] = lr / rms_w if rms_w > 0 else float("nan")
    if not med:
        raise SkipCheck("no weight tensor with a non-zero norm and a recorded update")
    lo_w, hi_w, lo_i, hi_i = (center * t[k] for k in ("low_warn", "high_warn", "low_info", "high_info"))
    low = {k: (potential.get(k, v[0]), v[1], v[2]) for k, v in med.items()}  # low side: what lr allows
    groups = {
        ("warning", "low"): {k: v for k, v in low.items() if v[0] < lo_w},
        ("warning", "high"): {k: v for k, v in med.items() if v[0] > hi_w},
        ("info", "low"): {k: v for k, v in low.items() if lo_w <= v[0] < lo_i},
        ("info", "high"): {k: v for k, v in med.items() if hi_i < v[0] <= hi_w},
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
        what = (
            "can change by (lr / RMS(w))" if side == "low" and worst in potential else "change by a median ‖Δw‖/‖w‖ of"
        )
        msg = (f"{len(sel)} weight tensor(s) {what} {num(r)} per step over steps "
               f"{span[0]}–{span[1]} (e.g. {worst}), {decades} {'below' if side == 'low' else 'above'} the ~{num(center)} "
               f"that is healthy for {family}.")  # fmt: skip
        if frozen:
            msg = (
                msg[:-1]
                + f"; {len(frozen)} did not move at all"
                + (" and are in no optimizer param group." if not_in_opt else ".")
            )
        if side == "low":
            rec = (f"Raise the learning rate (or check the scheduler), and check that these parameters are in the "
                   f"optimizer and not frozen by accident (requires_grad, param groups). The healthy size depends on "
                   f"the optimizer: {why}.")  # fmt: skip
        else:
            rec = (f"Lower the learning rate or add warmup: each step moves these weights by a large fraction of their "
                   f"size, which destabilises training ({why}).")  # fmt: skip
        ev = {"params": {k: {"median_ratio": med[k][0], "layer": v[1], "lr": v[2],
                             **({"lr_over_rms_w": potential[k]} if k in potential else {})} for k, v in sel.items()},
              "frozen": frozen, "not_in_optimizer": not_in_opt, "window_steps": list(span), "optimizer": family,
              "healthy_center": center, "band": {"warn": [lo_w, hi_w], "info": [lo_i, hi_i]},
              "near_zero_init": near_zero, "thresholds": dict(t)}  # fmt: skip
        out.append(Finding(ID, sev, layer or None, span, msg, ev, rec))
    return out
