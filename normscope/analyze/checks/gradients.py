"""vanishing-gradients / exploding-gradients: output-gradient RMS along depth.

For the parametrised layers (conv/linear/…, not normalisation) in execution order, the RMS of
the gradient w.r.t. each layer's output, median over the last part of training. Flags when the
first layer's RMS is < 1e-3 × (vanishing) or > 1e3 × (exploding) the last layer's; reports the
per-layer backward gain RMS_l / RMS_{l+1} and the fitted geometric rate along depth.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import geometric_rate
from normscope.analyze.modinfo import is_norm
from normscope.analyze.registry import SkipCheck, register

V_ID = "vanishing-gradients"
E_ID = "exploding-gradients"


def depth_profile(ctx, window_frac: float) -> dict:
    g = ctx.grads
    g = g[g.output == ""]
    pairs = []
    for layer, call in ctx.layer_calls(g):
        info = ctx.modules.get(layer, {})
        if info.get("own_params", 0) > 0 and not is_norm(info.get("type")):
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


@register(
    id=V_ID, severity="error",
    summary="Gradient RMS at the first layer < 1e-3 × the last layer's: early layers barely learn.",
    needs=("grads",),
    params={"ratio": 1e-3, "error_ratio": 1e-6, "window_frac": 0.5},
)  # fmt: skip
def vanishing(ctx, p):
    prof = depth_profile(ctx, p["window_frac"])
    r = prof["ratio"]
    if not np.isfinite(r) or r >= p["ratio"]:
        return []
    sev = "error" if r < p["error_ratio"] else "warning"
    first, last = prof["pairs"][0][0], prof["pairs"][-1][0]
    msg = (f"Gradients vanish along depth: the gradient RMS at {first} is {num(r)} × the one at {last} "
           f"(median over steps {prof['window_steps'][0]}–{prof['window_steps'][1]}; it shrinks about ×{num(1 / prof['rate_per_layer'])} "
           f"per layer towards the input).")
    rec = ("Keep the backward gain near 1 (Glorot & Bengio 2010; He et al. 2015): use an init matched to the "
           "activation (He for ReLU, Xavier for tanh), non-saturating activations, normalisation layers, or residual "
           "connections; saturated sigmoid/tanh units are the usual cause.")
    return [Finding(V_ID, sev, first, tuple(prof["window_steps"]), msg, _evidence(prof, p), rec)]


@register(
    id=E_ID, severity="error",
    summary="Gradient RMS at the first layer > 1e3 × the last layer's: gradients grow geometrically towards the input.",
    needs=("grads",),
    params={"ratio": 1e3, "error_ratio": 1e6, "window_frac": 0.5},
)  # fmt: skip
def exploding(ctx, p):
    prof = depth_profile(ctx, p["window_frac"])
    r = prof["ratio"]
    if not np.isfinite(r) or r <= p["ratio"]:
        return []
    sev = "error" if r > p["error_ratio"] else "warning"
    first, last = prof["pairs"][0][0], prof["pairs"][-1][0]
    msg = (f"Gradients explode along depth: the gradient RMS at {first} is {num(r)} × the one at {last} "
           f"(median over steps {prof['window_steps'][0]}–{prof['window_steps'][1]}; it grows about ×{num(1 / prof['rate_per_layer'])} "
           f"per layer towards the input).")
    rec = ("Scale the initialisation so each layer keeps the signal's variance (He/Xavier: Var(w) = 2/fan_in or "
           "1/fan_in; Glorot & Bengio 2010; He et al. 2015), add normalisation layers, and clip gradients "
           "(torch.nn.utils.clip_grad_norm_) to keep single steps bounded.")
    return [Finding(E_ID, sev, first, tuple(prof["window_steps"]), msg, _evidence(prof, p), rec)]
