"""Optimisation checks: update-ratio, effective-lr, norm-weight-decay.

All read the collector's per-parameter table (‖w‖, ‖Δw‖ across the optimizer step, lr and
weight decay of the param group); effective-lr also needs the graph to know which weights feed
a normaliser (scale-invariant weights).
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import effective_lr, update_ratio
from normscope.analyze.modinfo import BATCHNORM, INSTANCENORM, LINEAR_LIKE, NORMS, is_norm
from normscope.analyze.registry import SkipCheck, register

UR_ID = "update-ratio"


def _param_dims(ctx) -> dict[str, int]:
    if ctx.model is None:
        return {}
    return {n: p.dim() for n, p in ctx.model.named_parameters()}


def _is_vector(ctx, dims, name: str, layer: str) -> bool:
    if name in dims:
        return dims[name] <= 1
    return name.rsplit(".", 1)[-1] == "bias" or is_norm(ctx.type_of(layer or "<root>"))


@register(
    id=UR_ID, severity="warning",
    summary="Per-step ‖Δw‖/‖w‖ two decades away from ~1e-3 (median over the last half): learning rate far too low/high, or weights frozen by accident.",
    needs=("params", "updates", "training"),
    params={"low_warn": 1e-5, "high_warn": 1e-1, "low_info": 1e-4, "high_info": 1e-2, "last_frac": 0.5,
            "include_1d": False},
)  # fmt: skip
def update_ratio_check(ctx, p):
    par = ctx.params
    par = par[par.requires_grad & par.update_norm.notna()]
    if not len(par):
        raise SkipCheck("no trainable parameter with a recorded update")
    dims = _param_dims(ctx)
    steps = np.sort(par.step.unique())
    cut = steps[min(len(steps) - 1, int(np.floor((1 - p["last_frac"]) * len(steps))))]
    tail = par[par.step >= cut]
    med: dict[str, tuple[float, str, float]] = {}
    for name, d in tail.groupby("param", sort=False):
        layer = str(d.layer.iloc[0])
        if not p["include_1d"] and _is_vector(ctx, dims, name, layer):
            continue
        r = update_ratio(d.update_norm.to_numpy(float), d.norm.to_numpy(float))
        if np.isfinite(r).any():
            lrs = d.lr.to_numpy(float)
            lr = float(np.median(lrs[np.isfinite(lrs)])) if np.isfinite(lrs).any() else float("nan")
            med[str(name)] = (float(np.nanmedian(r)), layer, lr)
    if not med:
        raise SkipCheck("no weight tensor with a non-zero norm and a recorded update")
    groups = {
        ("warning", "low"): {k: v for k, v in med.items() if v[0] < p["low_warn"]},
        ("warning", "high"): {k: v for k, v in med.items() if v[0] > p["high_warn"]},
        ("info", "low"): {k: v for k, v in med.items() if p["low_warn"] <= v[0] < p["low_info"]},
        ("info", "high"): {k: v for k, v in med.items() if p["high_info"] < v[0] <= p["high_warn"]},
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
            msg = msg[:-1] + f"; {len(frozen)} did not move at all" + (
                " and are in no optimizer param group." if not_in_opt else ".")
        if side == "low":
            rec = ("Raise the learning rate (or check the scheduler), and check that these parameters are in the "
                   "optimizer and not frozen by accident (requires_grad, param groups). CS231n: updates of about "
                   "1e-3 of the weight scale are healthy for SGD; Adam at lr 1e-3 sits near 1e-2 early on.")
        else:
            rec = ("Lower the learning rate or add warmup: each step moves these weights by a large fraction of their "
                   "size, which destabilises training (CS231n: ~1e-3 is healthy for SGD).")
        ev = {"params": {k: {"median_ratio": v[0], "layer": v[1], "lr": v[2]} for k, v in sel.items()},
              "frozen": frozen, "not_in_optimizer": not_in_opt, "window_steps": list(span), "thresholds": dict(p)}  # fmt: skip
        out.append(Finding(UR_ID, sev, layer or None, span, msg, ev, rec))
    return out


EL_ID = "effective-lr"


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
        if ct in BATCHNORM | INSTANCENORM or (ct in NORMS and not has_bias):
            w = f"{n.module}.weight" if n.module != "<root>" else "weight"
            if w not in out:
                out.append(w)
    return out


@register(
    id=EL_ID, severity="info",
    summary="Effective learning rate η/‖w‖² of weights followed by a normaliser (scale-invariant): it drifts as ‖w‖ grows or shrinks.",
    needs=("params", "graph", "training"),
    params={"change": 2.0},
)  # fmt: skip
def effective_lr_check(ctx, p):
    g = ctx.require_graph()
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
        e, st = e[ok], d.step.to_numpy()[ok]
        k = max(1, len(e) // 20)
        start, end = float(np.mean(e[:k])), float(np.mean(e[-k:]))
        series[str(name)] = {"start": start, "end": end, "ratio": end / start if start > 0 else float("nan"),
                             "norm_start": float(d.norm.iloc[0]), "norm_end": float(d.norm.iloc[-1]),
                             "steps": st[:: max(1, len(st) // 50)].tolist(),
                             "effective_lr": e[:: max(1, len(e) // 50)].tolist()}  # fmt: skip
        changes.append((str(name), series[str(name)]["ratio"]))
    if not series:
        raise SkipCheck("fewer than two recorded steps for the scale-invariant weights")
    ratios = np.array([r for _, r in changes], dtype=float)
    med = float(np.nanmedian(ratios))
    moved = [n for n, r in changes if np.isfinite(r) and (r > p["change"] or r < 1 / p["change"])]
    worst = max(changes, key=lambda c: abs(np.log(c[1])) if np.isfinite(c[1]) and c[1] > 0 else 0)
    msg = (f"{len(series)} weight(s) feed a normaliser, so only their direction matters and the effective step is "
           f"η/‖w‖²: it changed by a median ×{num(med)} over the run"
           + (f" ({len(moved)} by more than ×{num(p['change'])}, most {worst[0]}: ×{num(worst[1])})." if moved else "."))
    rec = ("A measurement: for scale-invariant weights, L(αw) = L(w) and ∇L(αw) = ∇L(w)/α, so as ‖w‖ grows without "
           "weight decay training silently slows (van Laarhoven 2017; Hoffer et al. 2018). Weight decay on these "
           "weights, or a schedule that accounts for it, keeps the effective step steady.")
    layer = worst[0].rsplit(".", 1)[0] if "." in worst[0] else "<root>"
    return [Finding(EL_ID, "info", layer, None, msg, {"weights": series, "median_change": med, "graph": g.source}, rec)]


WD_ID = "norm-weight-decay"


def _decay_by_param(ctx) -> tuple[dict[str, float], str]:
    if ctx.optimizer is not None and ctx.model is not None:
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        out = {}
        for grp in ctx.optimizer.param_groups:
            for prm in grp["params"]:
                if id(prm) in names:
                    out[names[id(prm)]] = float(grp.get("weight_decay", 0.0) or 0.0)
        return out, "optimizer"
    par = ctx.params_all
    if len(par) and par.weight_decay.notna().any():
        last = par[par.step == par.step.max()]
        return {str(k): float(v) for k, v in zip(last.param, last.weight_decay) if np.isfinite(v)}, "run"
    groups = (ctx.probe.get("optimizer") or {}).get("groups") or []
    out = {}
    for grp in groups:
        for n in grp.get("params", []):
            out[n] = float(grp.get("weight_decay") or 0.0)
    if out:
        return out, "probe"
    raise SkipCheck("no weight-decay information: record with an optimizer, or pass optimizer= and model=")


@register(
    id=WD_ID, severity="warning",
    summary="Weight decay applied to normalisation γ/β (warning) or to biases (info); they are usually excluded.",
    needs=("training",),
    params={"biases": True},
)  # fmt: skip
def norm_weight_decay(ctx, p):
    wd, source = _decay_by_param(ctx)
    norm_params, bias_params = {}, {}
    for name, v in wd.items():
        if not v > 0:
            continue
        layer = name.rsplit(".", 1)[0] if "." in name else "<root>"
        if is_norm(ctx.type_of(layer)):
            norm_params[name] = v
        elif name.rsplit(".", 1)[-1] == "bias":
            bias_params[name] = v
    out = []
    rec = ("Put normalisation parameters and biases in a param group with weight_decay=0 (e.g. torchvision's "
           "--norm-weight-decay 0, or split model.named_parameters() by ndim <= 1): γ/β and biases are few and not "
           "scale-invariant, so decaying them only pulls them to 0 and, for the weights before a normaliser, L2 just "
           "moves the effective learning rate.")
    ev = {"normalisation_params": norm_params, "bias_params": bias_params, "source": source}
    if norm_params:
        first = min(norm_params, key=lambda n: ctx.order(n.rsplit(".", 1)[0]))
        msg = (f"Weight decay ({num(max(norm_params.values()))}) is applied to {len(norm_params)} normalisation "
               f"parameter(s) (γ/β, e.g. {first})" + (f" and {len(bias_params)} bias(es)." if bias_params else "."))
        out.append(Finding(WD_ID, "warning", first.rsplit(".", 1)[0], None, msg, ev, rec))
    elif bias_params and p["biases"]:
        first = min(bias_params, key=lambda n: ctx.order(n.rsplit(".", 1)[0]))
        msg = f"Weight decay ({num(max(bias_params.values()))}) is applied to {len(bias_params)} bias(es) (e.g. {first})."
        out.append(Finding(WD_ID, "info", first.rsplit(".", 1)[0], None, msg, ev, rec))
    return out
