"""exploding-gradients: whole-tensor output-gradient norm along depth (the backward gain).

What it measures, why it matters and how to fix it: docs/checks/exploding-gradients.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._gradflow import evidence, output_profile
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import Thresholds, register

ID = "exploding-gradients"


@register(
    id=ID, severity="error",
    summary="Output-gradient norm of the first layers > 1e3 × the last layers': gradients grow geometrically towards the input.",
    needs=("grads",),
    thresholds={"ratio": 1e3, "error_ratio": 1e6, "window_frac": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    prof = output_profile(ctx, t["window_frac"])
    r = prof["ratio"]
    if not np.isfinite(r) or r <= t["ratio"]:
        return []
    sev = "error" if r > t["error_ratio"] else "warning"
    first, last = prof["layers"][0], prof["layers"][-1]
    msg = (
        f"Gradients explode along depth: the gradient norm w.r.t. the outputs of the first layers ({first}, …) is "
        f"{num(r)} × that of the last ones (…, {last}; median over steps {prof['window_steps'][0]}–"
        f"{prof['window_steps'][1]}; ×{num(1 / prof['rate_per_layer'])} per layer towards the input)."
    )
    rec = (
        "Scale the initialisation so each layer keeps the signal's variance (He/Xavier: Var(w) = 2/fan_in or "
        "1/fan_in; Glorot & Bengio 2010; He et al. 2015), add normalisation layers, and clip gradients "
        "(torch.nn.utils.clip_grad_norm_) to keep single steps bounded."
    )
    return [Finding(ID, sev, first, tuple(prof["window_steps"]), msg, evidence(prof, t), rec)]
