"""vanishing-gradients: relative weight gradient ‖∇W‖/‖W‖ along depth (independent of tensor size and pooling).

What it measures, why it matters and how to fix it: docs/checks/vanishing-gradients.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._gradflow import evidence, weight_profile
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import Thresholds, register

ID = "vanishing-gradients"


@register(
    id=ID, severity="error",
    summary="Relative weight gradient ‖∇W‖/‖W‖ of the first layers < 1e-3 × the last layers': early layers barely learn.",
    needs=("params",),
    thresholds={"ratio": 1e-3, "error_ratio": 1e-6, "window_frac": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    prof = weight_profile(ctx, t["window_frac"])
    r = prof["ratio"]
    if not np.isfinite(r) or r >= t["ratio"]:
        return []
    sev = "error" if r < t["error_ratio"] else "warning"
    first, last = prof["layers"][0], prof["layers"][-1]
    msg = (
        f"Gradients vanish along depth: the relative weight gradient ‖∇W‖/‖W‖ of the first layers ({first}, …) is "
        f"{num(r)} × that of the last ones (…, {last}; median over steps {prof['window_steps'][0]}–"
        f"{prof['window_steps'][1]}): the early layers barely learn."
    )
    rec = (
        "Keep the backward gain near 1 (Glorot & Bengio 2010; He et al. 2015): use an init matched to the "
        "activation (He for ReLU, Xavier for tanh), non-saturating activations, normalisation layers, or residual "
        "connections; saturated sigmoid/tanh units are the usual cause."
    )
    return [Finding(ID, sev, first, tuple(prof["window_steps"]), msg, evidence(prof, t), rec)]
