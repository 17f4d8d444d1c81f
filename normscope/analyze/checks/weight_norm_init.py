"""weight-norm-init: weight-normalised layers (w = g·v/‖v‖) whose output scale at the first step is far from 1.

What it measures, why it matters and how to fix it: docs/checks/weight-norm-init.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import effective_lr
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "weight-norm-init"


def weight_norm_layers(ctx: Context) -> dict[str, list[dict]]:
    """layer → its weight-normalised tensors (``roles.weight_norm`` entries), in execution order."""
    out = {name: info["weight_norm"] for name, info in ctx.modules.items() if info.get("weight_norm")}
    return dict(sorted(out.items(), key=lambda kv: (ctx.order(kv[0]), kv[0])))


def _param(layer: str, leaf: str) -> str:
    return f"{layer}.{leaf}" if layer not in ("", "<root>") else leaf


def layer_profile(ctx: Context, layer: str, wn: dict) -> dict:
    """Output std per step; g's relative update ‖Δg‖/‖g‖; v's effective learning rate η/‖v‖²."""
    s = ctx.layer_series(layer, 0, "", df=ctx.train)
    prof: dict = {"layer": layer, "tensor": wn["tensor"], "api": wn["api"], "dim": wn["dim"],
                  "g": _param(layer, wn["g"]), "v": _param(layer, wn["v"])}  # fmt: skip
    if len(s):
        std = s["std"].to_numpy(float)
        prof.update(steps=s.step.astype(int).tolist(), output_std=std.tolist(), std_first=float(std[0]),
                    std_last=float(std[-1]))  # fmt: skip
        prof["std_drift"] = float(std[-1] / std[0]) if std[0] > 0 else float("nan")
        if "ch_var" in s.columns:  # per output unit: what data-dependent init sets to 1
            cv = np.asarray(s["ch_var"].iloc[0], dtype=float)
            if cv.size:
                prof["unit_std_first_median"] = float(np.sqrt(np.nanmedian(cv)))
    p = ctx.params
    if not len(p):
        return prof
    g = p[p.param == prof["g"]].sort_values("step")
    if len(g):
        n, u = g.norm.to_numpy(float), g.update_norm.to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(n > 0, u / n, np.nan)
        prof.update(g_steps=g.step.astype(int).tolist(), g_rel_update=rel.tolist(), g_norm_first=float(n[0]),
                    g_norm_last=float(n[-1]))  # fmt: skip
        prof["g_rel_update_median"] = float(np.nanmedian(rel)) if np.isfinite(rel).any() else float("nan")
    v = p[p.param == prof["v"]].sort_values("step")
    if len(v):
        e = effective_lr(v.lr.to_numpy(float), v.norm.to_numpy(float))
        prof.update(v_steps=v.step.astype(int).tolist(), v_effective_lr=e.tolist(), v_norm_first=float(v.norm.iloc[0]),
                    v_norm_last=float(v.norm.iloc[-1]), v_effective_lr_first=float(e[0]), v_effective_lr_last=float(e[-1]))  # fmt: skip
    return prof


@register(
    id=ID, severity="warning",
    summary="Weight-normalised layer (w = g·v/‖v‖) with output std < 0.1 or > 10 at the first step: g was not initialised from data.",
    needs=("stats", "params", "training"),
    thresholds={"low": 0.1, "high": 10.0},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    layers = weight_norm_layers(ctx)
    if not layers:
        raise SkipCheck("no weight-normalised layer (torch.nn.utils.parametrizations.weight_norm or weight_norm)")
    profs = [layer_profile(ctx, layer, wn) for layer, wns in layers.items() for wn in wns]
    judged = [p for p in profs if "std_first" in p]
    if not judged:
        raise SkipCheck("no output statistics recorded for the weight-normalised layers (not hooked)")
    bad = [p for p in judged if not t["low"] <= p["std_first"] <= t["high"]]
    ev = {"layers": profs, "thresholds": dict(t)}
    g_rel = [p["g_rel_update_median"] for p in judged if np.isfinite(p.get("g_rel_update_median", np.nan))]
    g_txt = (
        f"g moves by a median ‖Δg‖/‖g‖ = {num(float(np.median(g_rel)))} per step"
        if g_rel
        else "g's updates not recorded"
    )
    e = [p for p in judged if "v_effective_lr_first" in p]
    v_txt = (
        f"v's effective learning rate η/‖v‖² went {num(e[0]['v_effective_lr_first'])} → {num(e[0]['v_effective_lr_last'])} "
        f"(layer {e[0]['layer']})"
        if e
        else "v's learning rate not recorded"
    )
    if not bad:
        lo, hi = min(p["std_first"] for p in judged), max(p["std_first"] for p in judged)
        msg = (
            f"{len(judged)} weight-normalised layer(s) start with output std {num(lo)}–{num(hi)} (within "
            f"[{num(t['low'])}, {num(t['high'])}]); {g_txt}; {v_txt}."
        )
        rec = (
            "A measurement: with w = g·v/‖v‖ the output scale is g's, and v's step is scale-invariant (η/‖v‖², "
            "Salimans & Kingma 2016): ‖v‖ growing slows v's learning."
        )
        return [Finding(ID, "info", judged[0]["layer"], None, msg, ev, rec)]
    worst = max(bad, key=lambda p: abs(np.log(p["std_first"])) if p["std_first"] > 0 else np.inf)
    listed = ", ".join(f"{p['layer']} ({num(p['std_first'])})" for p in bad[:6]) + (" …" if len(bad) > 6 else "")
    drift = worst.get("std_last")
    msg = (
        f"{len(bad)} of {len(judged)} weight-normalised layer(s) start with output std far from 1 (outside "
        f"[{num(t['low'])}, {num(t['high'])}]): {listed}. With w = g·v/‖v‖ the output scale is set by g, and "
        f"{g_txt}: {worst['layer']}'s output std is {num(drift)} at the last step (×{num(worst['std_drift'])} over "
        f"the run); "
        f"{v_txt}."
    )
    rec = (
        "Initialise g and the bias from data (Salimans & Kingma 2016, §3): on one batch, set each unit's g = 1/σ and "
        "b = −μ/σ of its pre-activation, layer by layer — normscope.weight_norm_data_init(model, batch) does this for "
        "torch.nn.utils.parametrizations.weight_norm and the legacy weight_norm."
    )
    return [Finding(ID, "warning", worst["layer"], None, msg, ev, rec)]
