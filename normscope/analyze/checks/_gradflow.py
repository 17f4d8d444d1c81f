"""Gradient flow along depth, shared by vanishing-gradients and exploding-gradients."""

from __future__ import annotations

import numpy as np

from normscope.analyze.formulas import geometric_rate
from normscope.analyze.registry import SkipCheck
from normscope.roles import is_norm_info


def depth_profile(ctx, window_frac: float) -> dict:
    g = ctx.grads
    g = g[g.output == ""]
    pairs = []
    for layer, call in ctx.layer_calls(g):
        info = ctx.modules.get(layer, {})
        if info.get("own_params", 0) > 0 and not is_norm_info(info):
            pairs.append((layer, call))
    if len(pairs) < 2:
        raise SkipCheck("fewer than two parametrised layers with recorded output gradients")
    steps = np.sort(g.step.unique())
    w = max(1, int(np.ceil(window_frac * len(steps))))
    win = g[g.step >= steps[-w]]
    med = []
    for layer, call in pairs:
        d = win[(win.layer == layer) & (win.call == call)]
        med.append(float(np.nanmedian(d.rms.to_numpy(float))) if len(d) else float("nan"))
    med = np.asarray(med)
    first0 = g[g.step == steps[0]]
    init = []
    for layer, call in (pairs[0], pairs[-1]):
        d = first0[(first0.layer == layer) & (first0.call == call)]
        init.append(float(d.rms.iloc[0]) if len(d) else float("nan"))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = med[0] / med[-1]
        gains = (med[:-1] / med[1:]).tolist()
    return {"pairs": pairs, "rms": med.tolist(), "ratio": float(ratio), "gains": gains,
            "rate_per_layer": geometric_rate(med), "window_steps": [int(steps[-w]), int(steps[-1])],
            "ratio_first_step": init[0] / init[1] if init[1] else float("nan")}  # fmt: skip


def _evidence(prof, p) -> dict:
    return {
        "first_layer": prof["pairs"][0][0], "last_layer": prof["pairs"][-1][0], "ratio_first_over_last": prof["ratio"],
        "ratio_first_step": prof["ratio_first_step"],
        "per_layer": [{"layer": l, "call": c, "grad_rms": r} for (l, c), r in zip(prof["pairs"], prof["rms"])],
        "backward_gain": prof["gains"], "geometric_rate_per_layer": prof["rate_per_layer"],
        "window_steps": prof["window_steps"], "thresholds": dict(p),
    }  # fmt: skip
