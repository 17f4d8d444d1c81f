"""weight-sparsity (info): fraction of |w| below 1e-3·max|w| per layer.

L1 regularisation drives weights to exactly zero (sparse); L2 only shrinks them. Reads the
model's weights when given, else the probe's measurement at the end of the run."""

from __future__ import annotations

from normscope.analyze.checks._util import pct
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.quantities import RELS, weight_sparsity
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "weight-sparsity"


@register(
    id=ID, severity="info",
    summary="Fraction of weights below 1e-3·max|w| per layer: L1 makes weights exactly sparse, L2 only shrinks them.",
    needs=("weights",),
    thresholds={"rel": 1e-3, "info_frac": 0.25},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    key = f"{t['rel']:.0e}"
    if ctx.model is not None:
        data = weight_sparsity(ctx.model, rels=(t["rel"],))
    else:
        data = ctx.probe["weights"]  # the "weights" need guarantees it
        if any(key not in d["frac_below"] for d in data.values()):
            raise SkipCheck(f"the probe measured sparsity at {', '.join(f'{r:.0e}' for r in RELS)} only; pass model=")
    if not data:
        raise SkipCheck("no finite weight tensor with two or more dimensions")
    sparse = {n: d["frac_below"][key] for n, d in data.items() if d["frac_below"][key] >= t["info_frac"]}
    if not sparse:
        return []
    worst = max(sparse, key=sparse.get)
    msg = (
        f"{len(sparse)} weight tensor(s) are mostly near zero: up to {pct(sparse[worst])} of {worst} lies below "
        f"{t['rel']:g} × its largest magnitude."
    )
    rec = (
        "Expected with L1 regularisation, which drives weights to exactly zero (L2 only shrinks them): prune or "
        "store these layers sparsely. Unintended sparsity can mean dead inputs upstream."
    )
    ev = {"sparse": sparse, "all": {n: d["frac_below"][key] for n, d in data.items()}, "rel": t["rel"],
          "source": "model" if ctx.model is not None else "probe"}  # fmt: skip
    return [Finding(ID, "info", data[worst]["layer"], None, msg, ev, rec)]
