"""Structural checks: redundant-bias, bn-in-sequence-model, legacy-lrn.

They read the module graph (fx, hooks, or execution order — named in the evidence) and module
attributes (from the model passed to ``analyze`` or the probe file).
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.finding import Finding
from normscope.analyze.modinfo import BATCHNORM, EMBEDDING, INSTANCENORM, LINEAR_LIKE, LRN, SEQUENCE
from normscope.analyze.registry import SkipCheck, register

RB_ID = "redundant-bias"


@register(
    id=RB_ID, severity="warning",
    summary="A conv/linear bias whose output goes straight into BatchNorm: the mean subtraction cancels it (wasted parameters, a weight-decay target).",
    needs=("graph",),
    params={},
)  # fmt: skip
def redundant_bias(ctx, p):
    g = ctx.require_graph()
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
        tail = f" (and weight decay {decay:g} pulls on it)" if decay is not None and np.isfinite(decay) and decay > 0 else ""
        msg = (f"The bias of {n.module} ({ctx.node_type(n)}) feeds {cons[0].module} ({ctype}) directly: the mean "
               f"subtraction cancels it, so it is a wasted parameter{tail}.")
        rec = (f"Create {n.module} with bias=False; the BatchNorm's shift β already provides the per-channel offset "
               "(Ioffe & Szegedy 2015).")
        out.append(Finding(RB_ID, "warning", n.module, None, msg, ev, rec))
    return out


SQ_ID = "bn-in-sequence-model"


def _bn_input_length(ctx, layer: str) -> float | None:
    tr = ctx.train
    if not len(tr):
        return None
    d = tr[(tr.layer == layer) & (tr.output == "input")]
    if not len(d):
        return None
    r = d.iloc[0]
    c = len(r.ch_mean)
    return float(r["count"]) / max(float(r.samples) * c, 1.0)


@register(
    id=SQ_ID, severity="warning",
    summary="BatchNorm in a recurrent/attention model: statistics mix time steps and padding; LayerNorm normalises each sample on its own.",
    needs=(),
    params={},
)  # fmt: skip
def bn_in_sequence(ctx, p):
    types = {name: info.get("type") for name, info in ctx.modules.items()}
    bns = [n for n, t in types.items() if t in BATCHNORM]
    if not bns:
        raise SkipCheck("no BatchNorm layer in the model")
    seq = sorted({t for t in types.values() if t in SEQUENCE})
    emb = sorted({t for t in types.values() if t in EMBEDDING})
    if not seq and not emb:
        return []
    out = []
    for bn in sorted(bns, key=ctx.order):
        length = _bn_input_length(ctx, bn)
        if not seq and not (length is not None and length > 1):
            continue  # embeddings + BN over features only (tabular models) is fine
        ev = {"sequence_modules": seq, "embedding_modules": emb, "bn_type": types[bn],
              "positions_per_sample": length}  # fmt: skip
        kind = ", ".join(seq or emb)
        msg = (f"{bn} ({types[bn]}) normalises over the batch{' and time' if length and length > 1 else ''} axes of a "
               f"sequence model ({kind}): its statistics mix time steps and padding, and change with sequence length "
               f"between training and inference.")
        rec = ("Use LayerNorm (Ba et al. 2016), which normalises each sample — each time step — on its own and is the "
               "standard in RNNs and Transformers; if BatchNorm must stay, mask padded positions out of its statistics.")
        out.append(Finding(SQ_ID, "warning", bn, None, msg, ev, rec))
    return out


LRN_ID = "legacy-lrn"


@register(
    id=LRN_ID, severity="info",
    summary="LocalResponseNorm (AlexNet-era) is superseded by BatchNorm, which also makes it unnecessary.",
    needs=(),
    params={},
)  # fmt: skip
def legacy_lrn(ctx, p):
    lrns = [n for n, info in ctx.modules.items() if info.get("type") in LRN]
    if not lrns:
        raise SkipCheck("no LocalResponseNorm layer in the model")
    out = []
    has_bn = any(info.get("type") in BATCHNORM for info in ctx.modules.values())
    for name in sorted(lrns, key=ctx.order):
        msg = f"{name} is a LocalResponseNorm, a legacy normaliser from AlexNet (2012)" + (
            " in a model that also uses BatchNorm." if has_bn else "; BatchNorm superseded it.")
        rec = ("Replace it with BatchNorm after the convolution (Ioffe & Szegedy 2015 found LRN unnecessary once "
               "BN is used), or drop it; keep it only to reproduce a historical model.")
        out.append(Finding(LRN_ID, "info", name, None, msg, {"type": ctx.modules[name].get("type"), "model_has_bn": has_bn}, rec))
    return out
