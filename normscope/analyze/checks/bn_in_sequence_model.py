"""bn-in-sequence-model: BatchNorm in a recurrent/attention model: statistics mix time steps and padding; LayerNorm normalises each sample on its own.

What it measures, why it matters and how to fix it: docs/checks/bn-in-sequence-model.md.
"""

from __future__ import annotations

from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM, EMBEDDING, SEQUENCE

ID = "bn-in-sequence-model"


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
    id=ID, severity="warning",
    summary="BatchNorm in a recurrent/attention model: statistics mix time steps and padding; LayerNorm normalises each sample on its own.",
    needs=(),
    thresholds={},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    types = {name: info.get("type") for name, info in ctx.modules.items()}
    bns = [n for n, tp in types.items() if tp in BATCHNORM]
    if not bns:
        raise SkipCheck("no BatchNorm layer in the model")
    seq = sorted({tp for tp in types.values() if tp in SEQUENCE})
    emb = sorted({tp for tp in types.values() if tp in EMBEDDING})
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
        msg = (
            f"{bn} ({types[bn]}) normalises over the batch{' and time' if length and length > 1 else ''} axes of a "
            f"sequence model ({kind}): its statistics mix time steps and padding, and change with sequence length "
            f"between training and inference."
        )
        rec = (
            "Use LayerNorm (Ba et al. 2016), which normalises each sample — each time step — on its own and is the "
            "standard in RNNs and Transformers; if BatchNorm must stay, mask padded positions out of its statistics."
        )
        out.append(Finding(ID, "warning", bn, None, msg, ev, rec))
    return out
