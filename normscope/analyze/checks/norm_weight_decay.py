"""norm-weight-decay: Weight decay applied to normalisation γ/β (warning) or to biases (info); they are usually excluded.

What it measures, why it matters and how to fix it: docs/checks/norm-weight-decay.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import is_norm

ID = "norm-weight-decay"


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
    id=ID, severity="warning",
    summary="Weight decay applied to normalisation γ/β (warning) or to biases (info); they are usually excluded.",
    needs=("training",),
    thresholds={"biases": True},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
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
    rec = (
        "Put normalisation parameters and biases in a param group with weight_decay=0 (e.g. torchvision's "
        "--norm-weight-decay 0, or split model.named_parameters() by ndim <= 1): γ/β and biases are few and not "
        "scale-invariant, so decaying them only pulls them to 0 and, for the weights before a normaliser, L2 just "
        "moves the effective learning rate."
    )
    ev = {"normalisation_params": norm_params, "bias_params": bias_params, "source": source}
    if norm_params:
        first = min(norm_params, key=lambda n: ctx.order(n.rsplit(".", 1)[0]))
        msg = (
            f"Weight decay ({num(max(norm_params.values()))}) is applied to {len(norm_params)} normalisation "
            f"parameter(s) (γ/β, e.g. {first})" + (f" and {len(bias_params)} bias(es)." if bias_params else ".")
        )
        out.append(Finding(ID, "warning", first.rsplit(".", 1)[0], None, msg, ev, rec))
    elif bias_params and t["biases"]:
        first = min(bias_params, key=lambda n: ctx.order(n.rsplit(".", 1)[0]))
        msg = (
            f"Weight decay ({num(max(bias_params.values()))}) is applied to {len(bias_params)} bias(es) (e.g. {first})."
        )
        out.append(Finding(ID, "info", first.rsplit(".", 1)[0], None, msg, ev, rec))
    return out
