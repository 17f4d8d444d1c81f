"""covariate-shift (info): moment-based drift of each layer's input/output distribution.

Fits a per-channel Gaussian to the recorded moments at sampled steps t and t − k and reports
the mean symmetric KL (and normalised W₂²) per layer. Santurkar et al. (2018) showed such shift
is not harmful by itself, so this is a measurement, never a warning: it notes layers whose drift
stays high late in training.

Two moment sets come from two different batches, so the drift between them holds the
batch-to-batch sampling noise besides any real shift; with few samples per channel (a Linear
output at batch 4, or a sparse, mostly-zero channel after a ReLU or a Dropout) that noise alone
reaches a KL of several units. The check measures the noise on the run itself: the drift between
the closest sampled steps (for which the model barely moved) has the same noise as the drift k
steps apart, and a real shift grows with the gap. A layer is noted only when its drift k steps
apart exceeds that closest-step drift by ``info_kl`` and is at least twice it."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import finite_median, num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.quantities import covariate_shift
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "covariate-shift"
KEY = ["layer", "call", "output"]


def _gaps(ctx: Context) -> tuple[int, int]:
    """(the smallest gap between consecutive sampled train steps, the steps they span); (0, 0)
    without two sampled steps."""
    steps = np.unique(ctx.train.step.to_numpy(dtype=np.int64)) if len(ctx.train) else np.zeros(0, np.int64)
    if len(steps) < 2:
        return 0, 0
    return int(np.diff(steps).min()), int(steps[-1] - steps[0])


@register(
    id=ID, severity="info",
    summary="Per-layer drift of activation distributions between steps (symmetric Gaussian KL, W2); notes layers whose late drift stays high beyond the batch-to-batch noise.",
    needs=("stats", "training"),
    thresholds={"lag": 10, "late_frac": 0.25, "info_kl": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    gap, span = _gaps(ctx)
    if gap == 0:
        raise SkipCheck("fewer than two sampled steps per layer: no drift to measure")
    lag = max(int(t["lag"]), 3 * gap)  # sparse rows: three gaps, so the closest pairs stay a noise reference
    if span < lag:
        raise SkipCheck(f"the sampled training steps span {span} step(s), fewer than the {lag} (the lag, or three "
                        f"gaps between sampled steps) the drift is measured over: sample more often or train longer")  # fmt: skip
    far = covariate_shift(ctx, lag=lag)
    near = covariate_shift(ctx, lag=1)
    if not len(far):
        raise SkipCheck("fewer than two sampled steps per layer: no drift to measure")
    near = near[(near.step - near.prev_step) == gap]
    near_by = {k: d for k, d in near.groupby(KEY, sort=False)}
    late, masked = [], 0
    for key, d in far.groupby(KEY, sort=False):
        steps = d.step.to_numpy()
        cut = steps.min() + (1 - t["late_frac"]) * (steps.max() - steps.min())
        tail = d[d.step >= cut]
        if not len(tail):
            continue
        med = finite_median(tail.sym_kl)
        if not (np.isfinite(med) and med > t["info_kl"]):
            continue
        nd = near_by.get(key)
        nd = nd[nd.step >= cut] if nd is not None else None
        noise = finite_median(nd.sym_kl) if nd is not None and len(nd) else float("nan")
        if not np.isfinite(noise):
            nd = near_by.get(key)  # no closest pair in the late window: the noise over the whole run
            noise = finite_median(nd.sym_kl) if nd is not None and len(nd) else float("nan")
        if not np.isfinite(noise):
            continue  # nothing to tell noise from drift with
        if med - noise > t["info_kl"] and med >= 2 * noise:
            late.append((*key, med, finite_median(tail.w2), noise))
        else:
            masked += 1
    if not late:
        return []
    late.sort(key=lambda r: -r[3])
    top = late[0]
    names = ", ".join(f"{r[0]}{'[input]' if r[2] == 'input' else ''}" for r in late[:5])
    apart = f"{lag} apart" if lag == t["lag"] else f"{lag} apart (three gaps between sampled steps)"
    msg = (f"{len(late)} layer output(s) keep drifting late in training ({names}{', …' if len(late) > 5 else ''}): "
           f"median symmetric KL between steps {apart} up to {num(top[3])}, against {num(top[5])} between the "
           f"closest sampled steps (the batch-to-batch noise).")  # fmt: skip
    ev = {"layers": [{"layer": l, "call": c, "output": o, "late_sym_kl": k, "late_w2": w, "noise_sym_kl": n}
                     for l, c, o, k, w, n in late],
          "lag": lag, "noise_gap": gap, "late_frac": t["late_frac"], "within_noise": masked}  # fmt: skip
    rec = (
        "A measurement, not a fault (Santurkar et al. 2018: this shift does not by itself slow training). If "
        "training is unstable, a lower learning rate or a normalisation layer before these layers steadies "
        "their inputs."
    )
    return [Finding(ID, "info", top[0], None, msg, ev, rec)]
