"""legacy-lrn: LocalResponseNorm (AlexNet-era) is superseded by BatchNorm, which also makes it unnecessary.

What it measures, why it matters and how to fix it: docs/checks/legacy-lrn.md.
"""

from __future__ import annotations

from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM, LRN

ID = "legacy-lrn"


@register(
    id=ID, severity="info",
    summary="LocalResponseNorm (AlexNet-era) is superseded by BatchNorm, which also makes it unnecessary.",
    needs=(),
    thresholds={},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    lrns = [n for n, info in ctx.modules.items() if info.get("type") in LRN]
    if not lrns:
        raise SkipCheck("no LocalResponseNorm layer in the model")
    out = []
    has_bn = any(info.get("type") in BATCHNORM for info in ctx.modules.values())
    for name in sorted(lrns, key=ctx.order):
        msg = f"{name} is a LocalResponseNorm, a legacy normaliser from AlexNet (2012)" + (
            " in a model that also uses BatchNorm." if has_bn else "; BatchNorm superseded it."
        )
        rec = (
            "Replace it with BatchNorm after the convolution (Ioffe & Szegedy 2015 found LRN unnecessary once "
            "BN is used), or drop it; keep it only to reproduce a historical model."
        )
        out.append(
            Finding(ID, "info", name, None, msg, {"type": ctx.modules[name].get("type"), "model_has_bn": has_bn}, rec)
        )
    return out
