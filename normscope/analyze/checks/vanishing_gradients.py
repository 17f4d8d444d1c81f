"""vanishing-gradients: Gradient RMS at the first layer < 1e-3 × the last layer's: early layers barely learn.

What it measures, why it matters and how to fix it: docs/checks/vanishing-gradients.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._gradflow import _evidence, depth_profile
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import Thresholds, register

ID = "vanishing-gradients"


@register(
    id=ID, severity="error",
    summary="Gradient RMS at the first layer < 1e-3 × the last layer's: early layers barely learn.",
    needs=("grads",),
    thresholds={"ratio": 1e-3, "error_ratio": 1e-6, "window_frac": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    prof = depth_profile(ctx, t["window_frac"])
    r = prof["ratio"]
    if not np.isfinite(r) or r >= t["ratio"]:
        return []
    sev = "error" if r < t["error_ratio"] else "warning"
    first, last = prof["pairs"][0][0], prof["pairs"][-1][0]
    msg = (
        f"Gradients vanish along depth: the gradient RMS at {first} is {num(r)} × the one at {last} "
        f"(median over steps {prof['window_steps'][0]}–{prof['window_steps'][1]}; it shrinks about ×{num(1 / prof['rate_per_layer'])} "
        f"per layer towards the input)."
    )
    rec = (
        "Keep the backward gain near 1 (Glorot & Bengio 2010; He et al. 2015): use an init matched to the "
        "activation (He for ReLU, Xavier for tanh), non-saturating activations, normalisation layers, or residual "
        "connections; saturated sigmoid/tanh units are the usual cause."
    )
    return [Finding(ID, sev, first, tuple(prof["window_steps"]), msg, _evidence(prof, t), rec)]
