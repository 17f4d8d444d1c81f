"""weight-sparsity (info): fraction of |w| below 1e-3·max|w| per layer.

L1 regularisation drives weights to exactly zero (sparse); L2 only shrinks them. Reads the
model's weights when given, else the probe's measurement at the end of the run.
"""

from __future__ import annotations


from normscope.analyze.checks._util import pct
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, register

ID = "weight-sparsity"
RELS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def weight_sparsity(model, rels=RELS) -> dict[str, dict]:
    """{param: {layer, numel, max_abs, frac_below: {"1e-03": f, ...}}} for weight tensors with ndim ≥ 2."""
    import torch

    out = {}
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() < 2 or w.numel() == 0:
                continue
            a = w.detach().abs().double()
            if not bool(torch.isfinite(a).all()):
                continue  # non-finite weights: non-finite reports them
            mx = float(a.max())
            fr = {f"{r:.0e}": float((a < r * mx).double().mean()) if mx > 0 else 1.0 for r in rels}
            out[name] = {"layer": name.rsplit(".", 1)[0] if "." in name else "<root>", "numel": int(w.numel()),
                         "max_abs": mx, "frac_below": fr}  # fmt: skip
    return out


@register(
    id=ID, severity="info",
    summary="Fraction of weights below 1e-3·max|w| per layer: L1 makes weights exactly sparse, L2 only shrinks them.",
    needs=(),
    params={"rel": 1e-3, "info_frac": 0.25},
)  # fmt: skip
def check(ctx, p):
    key = f"{p['rel']:.0e}"
    if ctx.model is not None:
        data = weight_sparsity(ctx.model, rels=(p["rel"],))
    else:
        data = ctx.probe.get("weights")
        if not data:
            raise SkipCheck("needs the weights: pass model= to analyze(), or record the run with normscope.probe")
        if any(key not in d["frac_below"] for d in data.values()):
            raise SkipCheck(f"the probe measured sparsity at {', '.join(f'{r:.0e}' for r in RELS)} only; pass model=")
    if not data:
        raise SkipCheck("no finite weight tensor with two or more dimensions")
    sparse = {n: d["frac_below"][key] for n, d in data.items() if d["frac_below"][key] >= p["info_frac"]}
    if not sparse:
        return []
    worst = max(sparse, key=sparse.get)
    msg = (f"{len(sparse)} weight tensor(s) are mostly near zero: up to {pct(sparse[worst])} of {worst} lies below "
           f"{p['rel']:g} × its largest magnitude.")
    rec = ("Expected with L1 regularisation, which drives weights to exactly zero (L2 only shrinks them): prune or "
           "store these layers sparsely. Unintended sparsity can mean dead inputs upstream.")
    ev = {"sparse": sparse, "all": {n: d["frac_below"][key] for n, d in data.items()}, "rel": p["rel"],
          "source": "model" if ctx.model is not None else "probe"}  # fmt: skip
    return [Finding(ID, "info", data[worst]["layer"], None, msg, ev, rec)]
