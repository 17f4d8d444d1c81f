"""redundant-bias: A conv/linear bias whose output goes straight into BatchNorm: the mean subtraction cancels it (wasted parameters, a weight-decay target).

What it measures, why it matters and how to fix it: docs/checks/redundant-bias.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM, INSTANCENORM, LINEAR_LIKE

ID = "redundant-bias"


@register(
    id=ID, severity="warning",
    summary="A conv/linear bias whose output goes straight into BatchNorm: the mean subtraction cancels it (wasted parameters, a weight-decay target).",
    needs=("graph",),
    thresholds={},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    g = ctx.graph  # the "graph" need guarantees it
    producers = [n for n in g.module_nodes() if ctx.node_type(n) in LINEAR_LIKE]
    if not producers:
        raise SkipCheck("no conv/linear layer in the model")
    if all("bias" not in ctx.modules.get(n.module, {}) for n in producers):
        raise SkipCheck("bias presence unknown: pass model= to analyze(), or record the run with normscope.probe")
    wd = {}
    par = ctx.params_all
    if len(par):
        last = par[par.step == par.step.max()]
        wd = dict(zip(last.param, last.weight_decay))
    out, done = [], set()
    for n in producers:
        if n.module in done or not ctx.modules.get(n.module, {}).get("bias"):
            continue
        cons = g.consumers(n.id)
        if len(cons) != 1 or cons[0].op != "module":
            continue
        ctype = ctx.node_type(cons[0])
        if ctype not in BATCHNORM | INSTANCENORM:
            continue
        done.add(n.module)
        bias = f"{n.module}.bias" if n.module != "<root>" else "bias"
        decay = wd.get(bias)
        ev = {"producer": n.module, "producer_type": ctx.node_type(n), "norm": cons[0].module, "norm_type": ctype,
              "graph": g.source, "bias_weight_decay": decay}  # fmt: skip
        tail = (
            f" (and weight decay {decay:g} pulls on it)"
            if decay is not None and np.isfinite(decay) and decay > 0
            else ""
        )
        msg = (
            f"The bias of {n.module} ({ctx.node_type(n)}) feeds {cons[0].module} ({ctype}) directly: the mean "
            f"subtraction cancels it, so it is a wasted parameter{tail}."
        )
        rec = (
            f"Create {n.module} with bias=False; the BatchNorm's shift β already provides the per-channel offset "
            "(Ioffe & Szegedy 2015)."
        )
        out.append(Finding(ID, "warning", n.module, None, msg, ev, rec))
    return out
