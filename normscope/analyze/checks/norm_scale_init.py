"""norm-scale-init: normalisation layers whose scale γ started far below 1 (a conv/linear init applied to norm weights): the signal shrinks with depth.

What it measures, why it matters and how to fix it: docs/checks/norm-scale-init.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._gradflow import NEAR_ZERO_RMS, initial_rms
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.quantities import first_output_rms
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import is_norm_info

ID = "norm-scale-init"


def _scale_param(layer: str) -> str:
    return f"{layer}.weight" if layer not in ("", "<root>") else "weight"


@register(
    id=ID, severity="warning",
    summary="Normalisation layers whose scale γ started far below 1 (a conv/linear init applied to norm weights): the signal shrinks with depth.",
    needs=(),
    thresholds={"low": 0.1, "min_frac": 0.5, "collapse": 1e-3},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    rms = initial_rms(ctx)
    norms = [n for n, info in ctx.modules.items() if is_norm_info(info) and _scale_param(n) in rms]
    if not norms:
        raise SkipCheck("no normalisation layer with a recorded scale γ")
    norms.sort(key=lambda n: (ctx.order(n), n))
    # a γ at (or near) zero is the deliberate zero-init of a residual branch's last norm (Goyal et al. 2017),
    # or a (1 + w) parametrisation (Gemma's RMSNorm): not this mistake
    small = [n for n in norms if NEAR_ZERO_RMS <= rms[_scale_param(n)] < t["low"]]
    if not small or len(small) < t["min_frac"] * len(norms):
        return []
    init = np.array([rms[_scale_param(n)] for n in small])
    out_rms = {n: v for n, v in first_output_rms(ctx.train).items() if n in norms}
    seen = [n for n in norms if n in out_rms and out_rms[n] > 0]
    ratio = out_rms[seen[-1]] / out_rms[seen[0]] if len(seen) >= 2 else float("nan")
    collapsed = bool(np.isfinite(ratio) and ratio < t["collapse"])
    sev = "error" if collapsed else "warning"
    ev = {"layers": [{"layer": n, "severity": sev, "init_rms": rms[_scale_param(n)]} for n in small],
          "norm_layers": len(norms), "init_rms_median": float(np.median(init)),
          "init_rms": {n: rms[_scale_param(n)] for n in small}, "output_rms_first_step": out_rms,
          "output_rms_last_over_first": ratio, "signal_collapsed": collapsed, "thresholds": dict(t)}  # fmt: skip
    msg = (
        f"{len(small)} of {len(norms)} normalisation layers ({small[0]}, …) started with a scale γ of RMS "
        f"{num(ev['init_rms_median'])} instead of 1 — the random init of conv/linear weights applied to norm "
        f"weights: each multiplies its normalised output by ~{num(ev['init_rms_median'])}, and once ε outweighs the "
        f"shrunken variance the next normalisation cannot restore it."
    )
    if len(seen) >= 2:
        msg += (
            f" At the first step the output RMS is {num(out_rms[seen[0]])} at {seen[0]} and {num(out_rms[seen[-1]])} "
            f"at {seen[-1]}" + (": the forward signal has collapsed, and the gradients with it." if collapsed else ".")
        )
    rec = (
        "Initialise normalisation scales to 1 and shifts to 0 (PyTorch's default; Ioffe & Szegedy 2015), e.g. after "
        "building the model: for every BatchNorm/LayerNorm/GroupNorm m, nn.init.ones_(m.weight) and "
        "nn.init.zeros_(m.bias). Keep γ = 0 only where it is meant (the last norm of a residual branch, Goyal et "
        "al. 2017)."
    )
    return [Finding(ID, sev, small[0], None, msg, ev, rec)]
