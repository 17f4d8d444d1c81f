"""covariate-shift (info): moment-based drift of each layer's input/output distribution.

Fits a per-channel Gaussian to the recorded moments at sampled steps t and t − k and reports
the mean symmetric KL (and normalised W₂²) per layer. Santurkar et al. (2018) showed such shift
is not harmful by itself, so this is a measurement, never a warning: it notes layers whose drift
stays high late in training."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.quantities import covariate_shift
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "covariate-shift"


@register(
    id=ID, severity="info",
    summary="Per-layer drift of activation distributions between steps (symmetric Gaussian KL, W2); notes layers whose late drift stays high.",
    needs=("stats", "training"),
    thresholds={"lag": 10, "late_frac": 0.25, "info_kl": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    df = covariate_shift(ctx, lag=t["lag"])
    if not len(df):
        raise SkipCheck("fewer than two sampled steps per layer: no drift to measure")
    late = []
    for (layer, call, output), d in df.groupby(["layer", "call", "output"], sort=False):
        steps = d.step.to_numpy()
        cut = steps.min() + (1 - t["late_frac"]) * (steps.max() - steps.min())
        tail = d[d.step >= cut]
        if not len(tail):
            continue
        med = float(np.nanmedian(tail.sym_kl))
        if np.isfinite(med) and med > t["info_kl"]:
            late.append((layer, call, output, med, float(np.nanmedian(tail.w2))))
    if not late:
        return []
    late.sort(key=lambda r: -r[3])
    top = late[0]
    names = ", ".join(f"{l}{'[input]' if o == 'input' else ''}" for l, _, o, _, _ in late[:5])
    msg = (f"{len(late)} layer output(s) keep drifting late in training ({names}{', …' if len(late) > 5 else ''}): "
           f"median symmetric KL between steps {t['lag']} apart up to {num(top[3])}.")  # fmt: skip
    ev = {"layers": [{"layer": l, "call": c, "output": o, "late_sym_kl": k, "late_w2": w} for l, c, o, k, w in late],
          "lag": t["lag"], "late_frac": t["late_frac"]}  # fmt: skip
    rec = (
        "A measurement, not a fault (Santurkar et al. 2018: this shift does not by itself slow training). If "
        "training is unstable, a lower learning rate or a normalisation layer before these layers steadies "
        "their inputs."
    )
    return [Finding(ID, "info", top[0], None, msg, ev, rec)]
