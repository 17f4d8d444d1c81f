"""update-ratio: per-step ‖Δw‖/‖w‖ against the healthy size for the optimizer used; weights initialised at zero judged by their absolute updates.

What it measures, why it matters and how to fix it: docs/checks/update-ratio.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._gradflow import near_zero_init
from normscope.analyze.checks._util import num, pct
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import update_ratio
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import is_norm_info

ID = "update-ratio"


def _param_dims(ctx) -> dict[str, int]:
    if ctx.model is None:
        return {}
    return {n: p.dim() for n, p in ctx.model.named_parameters()}


def _is_vector(ctx, dims, name: str, layer: str) -> bool:
    if name in dims:
        return dims[name] <= 1
    return name.rsplit(".", 1)[-1] == "bias" or is_norm_info(ctx.modules.get(layer or "<root>", {}))


def _lr_peaks(par) -> dict[str, float]:
    """param → the highest learning rate recorded for it over the whole run (after any warmup)."""
    lr = par.lr.where(np.isfinite(par.lr.astype(float)) & (par.lr > 0))
    peak = lr.groupby(par.param, sort=False).max()
    return {str(k): float(v) for k, v in peak.items() if np.isfinite(v)}


def _optimizer(ctx) -> dict:
    return ctx.meta.get("optimizer") or (ctx.probe.get("optimizer") or {})


def _momentum(opt: dict) -> float:
    """The recorded SGD momentum μ (0 when absent or not a number)."""
    try:
        return float(opt.get("momentum") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def optimizer_band(ctx, t) -> tuple[str, float, str]:
    """(optimizer family, healthy centre of ‖Δw‖/‖w‖, why) for the optimizer the run used.

    SGD: ~1e-3 (CS231n); with momentum μ the step is lr/(1 − μ) × the gradient, so the centre moves
    up by 1/(1 − μ); Adam-family optimizers step each element by about lr whatever the gradient's
    scale, so ‖Δw‖/‖w‖ ≈ lr / RMS(w), ~1e-2 at lr 1e-3 for weights of RMS 0.02-0.1.
    """
    opt = _optimizer(ctx)
    name = str(opt.get("type") or "")
    low = name.lower()
    if any(k in low for k in ("adam", "lamb", "lion", "adafactor", "rmsprop", "adagrad", "adadelta", "nadam", "radam")):
        return name, t["adam_center"], f"{name} steps each weight by about its learning rate"
    mom = _momentum(opt)
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
                "adam_center": 1e-2, "last_frac": 0.5, "include_1d": False, "lr_collapse": 1e-3, "no_grad_warn": 0.1},
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
    sched: dict[str, tuple[float, float]] = {}  # param → (peak lr of the run, median lr / peak over the window)
    at_peak: dict[str, float] = {}  # param → median ratio scaled to the peak lr (the ratio itself at a constant lr)
    peaks = _lr_peaks(par)
    # a parameter that never got a gradient while others did: the loss does not depend on it in this run
    # (a branch not taken, a cut-off path); neither its learning rate nor rounding says anything about it
    grads = par.groupby("param", sort=False).grad_norm.apply(lambda g: bool(np.isfinite(g.to_numpy(float)).any()))
    never = [str(k) for k, got in grads.items() if not got] if grads.any() else []
    dtypes = ctx.meta.get("param_dtypes") or {}
    rounded: dict[str, dict] = {}  # low-precision weights whose every update rounded away
    for name, d in tail.groupby("param", sort=False):
        layer = str(d.layer.iloc[0])
        if name in never:
            continue
        if name in dtypes and name not in zero:
            r0 = _rounded_away(d, dtypes[name], adam, ctx)
            if r0 is not None:
                rounded[str(name)] = r0 | {"layer": layer}
                continue
        if not t["include_1d"] and _is_vector(ctx, dims, name, layer):
            continue
        lrs = d.lr.to_numpy(float)
        lr = float(np.median(lrs[np.isfinite(lrs)])) if np.isfinite(lrs).any() else float("nan")
        peak = peaks.get(name, float("nan"))
        frac = lrs / peak if np.isfinite(peak) and peak > 0 else np.full(len(lrs), np.nan)
        if np.isfinite(frac).any():
            sched[str(name)] = (peak, float(np.median(frac[np.isfinite(frac)])))
        if name in zero:
            # a weight that starts at (or near) zero: its ratio to its own norm means nothing; judge the
            # absolute size of its updates (zero: frozen)
            upd = d.update_norm.to_numpy(float) / np.sqrt(max(float(d.numel.iloc[0]), 1.0))
            near_zero[str(name)] = {"update_rms": float(np.median(upd)), "layer": layer, "lr": lr}
            if float(np.max(upd)) == 0.0:
                med[str(name)] = (0.0, layer, lr)
            continue
        r = update_ratio(d.update_norm.to_numpy(float), d.norm.to_numpy(float))
        if not np.isfinite(r).any():
            continue
        med[str(name)] = (float(np.nanmedian(r)), layer, lr)
        # the low side is judged at the run's peak learning rate: a step's update scales with its lr (SGD,
        # momentum and Adam alike), so r · peak / lr is what the step would move at the lr the run chose; a
        # schedule annealing the lr (cosine, step decay) is no reason to raise it
        use = np.isfinite(r) & np.isfinite(frac) & (frac > 0)  # steps at lr 0 (cosine's last) moved nothing
        if use.any():
            at_peak[str(name)] = float(np.median(r[use] / frac[use]))
        top = peak if np.isfinite(peak) else lr
        if adam and np.isfinite(top) and med[str(name)][0] > 0:
            # Adam's step per element is about lr whatever the gradient: the size it can take at the peak lr,
            # lr/RMS(w), says whether lr is too low; the actual ratio is smaller when gradients are noise
            rms_w = np.nanmedian(d.norm.to_numpy(float)) / np.sqrt(max(float(d.numel.iloc[0]), 1.0))
            potential[str(name)] = top / rms_w if rms_w > 0 else float("nan")
    out = _no_gradient(par, never, t) if never else []
    if rounded:
        out.append(_rounding_finding(rounded, (int(cut), int(steps[-1])), family, t))
    if not med:
        if out:
            return out
        raise SkipCheck("no weight tensor with a non-zero norm and a recorded update")
    lo_w, hi_w, lo_i, hi_i = (center * t[k] for k in ("low_warn", "high_warn", "low_info", "high_info"))
    # low side: what the lr allows (Adam), else the ratio at the run's peak lr; high side: the actual ratio
    low = {k: (potential.get(k, at_peak.get(k, v[0])), v[1], v[2]) for k, v in med.items()}
    groups = {
        ("warning", "low"): {k: v for k, v in low.items() if v[0] < lo_w},
        ("warning", "high"): {k: v for k, v in med.items() if v[0] > hi_w},
        ("info", "low"): {k: v for k, v in low.items() if lo_w <= v[0] < lo_i},
        ("info", "high"): {k: v for k, v in med.items() if hi_i < v[0] <= hi_w},
    }
    span = (int(cut), int(steps[-1]))
    common = {"window_steps": list(span), "optimizer": family, "healthy_center": center,
              "band": {"warn": [lo_w, hi_w], "info": [lo_i, hi_i]}, "near_zero_init": near_zero,
              "thresholds": dict(t)}  # fmt: skip
    for (sev, side), sel in groups.items():
        if not sel:
            continue
        worst = min(sel, key=lambda k: sel[k][0]) if side == "low" else max(sel, key=lambda k: sel[k][0])
        r, layer, lr = sel[worst]
        frozen = [k for k, v in sel.items() if v[0] == 0.0]
        not_in_opt = [k for k, v in sel.items() if not np.isfinite(v[2])]
        decades = "two decades" if sev == "warning" else "a decade"
        scaled = side == "low" and worst in sched and sched[worst][1] < 1.0 - 1e-6
        if side == "low" and worst in potential:
            what = "can change by (lr / RMS(w))"
        else:
            what = "change by a median ‖Δw‖/‖w‖ of"
        where = (f" at the run's peak learning rate {num(sched[worst][0])} (the schedule kept it at a median "
                 f"×{num(sched[worst][1])} of that over these steps)" if scaled else "")  # fmt: skip
        msg = (f"{len(sel)} weight tensor(s) {what} {num(r)} per step{where} over steps "
               f"{span[0]}–{span[1]} (e.g. {worst}), {decades} {'below' if side == 'low' else 'above'} the ~{num(center)} "
               f"that is healthy for {family}.")  # fmt: skip
        if frozen:
            msg = (
                msg[:-1]
                + f"; {len(frozen)} did not move at all"
                + (" and are in no optimizer param group." if not_in_opt else ".")
            )
        if side == "low":
            rec = (f"Raise the learning rate, and check that these parameters are in the optimizer and not frozen by "
                   f"accident (requires_grad, param groups). The healthy size depends on the optimizer: {why}.")  # fmt: skip
        else:
            rec = (f"Lower the learning rate or add warmup: each step moves these weights by a large fraction of their "
                   f"size, which destabilises training ({why}).")  # fmt: skip
        ev = {"params": {k: {"median_ratio": med[k][0], "layer": v[1], "lr": v[2],
                             **({"lr_over_rms_w": potential[k]} if k in potential else {}),
                             **({"ratio_at_peak_lr": at_peak[k]} if k in at_peak else {}),
                             **({"lr_peak": sched[k][0], "lr_fraction": sched[k][1]} if k in sched else {})}
                         for k, v in sel.items()},
              "frozen": frozen, "not_in_optimizer": not_in_opt, **common}  # fmt: skip
        out.append(Finding(ID, sev, layer or None, span, msg, ev, rec))
    collapsed = {k: v for k, v in sched.items() if v[1] < t["lr_collapse"]}
    if collapsed:
        worst = min(collapsed, key=lambda k: collapsed[k][1])
        peak, frac = collapsed[worst]
        layer = med[worst][1] if worst in med else near_zero.get(worst, {}).get("layer", "")
        msg = (f"The learning rate of {len(collapsed)} weight tensor(s) (e.g. {worst}) stayed at a median ×{num(frac)} "
               f"of the run's peak {num(peak)} over steps {span[0]}–{span[1]}: the schedule took it down by more than "
               f"{num(1 / t['lr_collapse'])}×, so these weights all but stopped training for the second half of the run.")  # fmt: skip
        rec = ("Check the scheduler. One written for epochs (StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR "
               "with periods in epochs) but stepped after every batch decays in a few hundred steps what was meant "
               "for the whole run: step it once per epoch, or give its periods in steps. A schedule that anneals to "
               "zero should get there at the end of training, not halfway.")  # fmt: skip
        ev = {"params": {k: {"lr_peak": v[0], "lr_fraction": v[1]} for k, v in collapsed.items()}, **common}
        out.append(Finding(ID, "warning", layer or None, span, msg, ev, rec))
    return out


def _no_gradient(par, never: list[str], t) -> list[Finding]:
    """One finding for the trainable parameters that received no gradient at any recorded step: info
    while they are a small part of the model (an unused token or head), warning from ``no_grad_warn``
    of the trainable elements on (a backbone cut off by .detach() or torch.no_grad())."""
    numel = par.groupby("param", sort=False).numel.first().astype(float)
    elements = float(numel[never].sum())
    share = elements / float(numel.sum()) if numel.sum() > 0 else float("nan")
    worst = max(never, key=lambda k: numel[k])
    layer = str(par[par.param == worst].layer.iloc[0])
    sev = "warning" if share >= t["no_grad_warn"] else "info"
    msg = (f"{len(never)} trainable parameter tensor(s) ({int(elements)} elements, {pct(share)} of the trainable "
           f"ones; e.g. {worst}) received no gradient at any recorded step: the loss does not depend on them in this "
           f"run, so their learning rate is not judged.")  # fmt: skip
    if sev == "warning":
        rec = ("Check that the forward reaches them: a .detach(), a torch.no_grad() block, or an output left out of "
               "the loss cuts them off, and they train as if frozen.")  # fmt: skip
    else:
        rec = ("Nothing to do if the branch is unused on purpose (DINOv2's mask_token without bool_masked_pos, a "
               "head this task does not call); leaving such parameters out of the optimizer saves their state, and "
               "DistributedDataParallel needs find_unused_parameters=True for them.")  # fmt: skip
    ev = {"no_gradient": never, "elements": int(elements), "share_of_trainable": share, "thresholds": dict(t)}
    return [Finding(ID, sev, layer or None, None, msg, ev, rec)]


MANTISSA_BITS = {"bfloat16": 7, "float16": 10}  # stored fraction bits


def half_spacing(x: float, dtype: str) -> float:
    """Half the distance from ``x`` to the next smaller number of ``dtype`` (2^(⌈log₂ x⌉ − p − 2) for p
    stored fraction bits): a step below it rounds back to ``x`` (round to nearest)."""
    p = MANTISSA_BITS.get(dtype)
    if p is None or not x > 0:
        return float("nan")
    return float(2.0 ** (np.ceil(np.log2(x)) - p - 2))  # the gap below x (at a power of two the smaller one)


def _rounded_away(d, dtype: str, adam: bool, ctx) -> dict | None:
    """A low-precision weight that never moved over the window although its optimizer stepped it by
    less than half the number spacing at its size: the step was rounded away. None otherwise."""
    if dtype not in MANTISSA_BITS or float(np.nanmax(d.update_norm.to_numpy(float))) != 0.0:
        return None
    lr = d.lr.to_numpy(float)
    if not np.isfinite(lr).any() or np.nanmax(lr) <= 0:
        return None  # in no param group, or lr 0: not a rounding question
    numel = max(float(d.numel.iloc[0]), 1.0)
    rms_w = float(np.nanmedian(d.norm.to_numpy(float))) / np.sqrt(numel)
    g = d.grad_norm.to_numpy(float)
    g = g[np.isfinite(g)]
    grad_rms = float(np.median(g)) / np.sqrt(numel) if len(g) else float("nan")
    if not grad_rms > 0:
        return None  # no gradient (or exactly zero): nothing to round away
    if adam:
        step = float(np.nanmax(lr))  # Adam moves each element by about lr
    else:
        step = float(np.nanmax(lr)) * grad_rms / max(1.0 - _momentum(_optimizer(ctx)), 1e-3)
    h = half_spacing(rms_w, dtype)
    if not (np.isfinite(step) and np.isfinite(h) and 0 < step < h):
        return None
    return {"dtype": dtype, "rms_w": rms_w, "step_per_element": step, "half_spacing": h, "lr": float(np.nanmax(lr))}


def _rounding_finding(rounded: dict[str, dict], span: tuple[int, int], family: str, t) -> Finding:
    worst = max(rounded, key=lambda k: rounded[k]["half_spacing"] / rounded[k]["step_per_element"])
    w = rounded[worst]
    dts = sorted({v["dtype"] for v in rounded.values()})
    msg = (f"{len(rounded)} {'/'.join(dts)} weight tensor(s) (e.g. {worst}) did not move at all over steps "
           f"{span[0]}–{span[1]}: {family} steps each element by about {num(w['step_per_element'])}, below half the "
           f"spacing of {w['dtype']} numbers at their size ({num(w['half_spacing'])} at RMS {num(w['rms_w'])}), so "
           f"every update rounds back to the old value.")  # fmt: skip
    rec = ("Keep float32 master weights: train the model in float32 under torch.autocast(dtype=torch.bfloat16) "
           "(mixed precision, Micikevicius et al. 2018), or use an optimizer that compensates the rounding "
           "(Kahan summation or stochastic rounding; Zamirai et al. 2020, Revisiting BFloat16 Training).")  # fmt: skip
    ev = {"rounded_away": rounded, "window_steps": list(span), "optimizer": family, "thresholds": dict(t)}
    return Finding(ID, "warning", w["layer"] or None, span, msg, ev, rec)
