"""output-logit-divergence: the final logits' log-partition log Σ exp(z) runs away from 0.

Cross-entropy does not see a constant added to all logits, so nothing holds log Z in place;
Wortsman et al. 2023 saw it drift far from 0 before the loss diverged, and PaLM's z-loss
1e-4·(log Z)² pins it. The collector records log Z over a subsample of output rows per sampled
step (normscope.collect.attention). Flags a mean log Z that moved by ``drift`` nats from the
first sampled step and ends beyond ``abs_warn`` nats from 0 (error beyond ``error``); logits
already beyond ``abs_warn`` at the first sampled step are the initialisation's scale (info)."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._transformer import end_window, signal_phase, thin, unrecorded, wide
from normscope.analyze.checks._util import finite_median, num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "output-logit-divergence"
NAMES = ("logz_mean", "logz_std", "z_absmax", "z_mean")

REC = (
    "Add the z-loss 1e-4·(log Z)² to the loss (PaLM, Chowdhery et al. 2022; Wortsman et al. 2023), which "
    "keeps log Σ exp(z) near 0 without changing the predictions; lower the learning rate; keep weight decay "
    "on the output layer, or cap the logits (tanh soft-capping as in Gemma 2)."
)


@register(
    id=ID, severity="error",
    summary="The final logits' mean log-partition log Σ exp(z) drifts far from 0 (runaway logit scale; fix: z-loss).",
    needs=("training",),
    thresholds={"drift": 10.0, "abs_warn": 50.0, "error": 100.0, "window_frac": 0.1, "min_window_steps": 3,
                "shift_max": 0.01},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    phase = signal_phase(ctx, "logz_mean")
    if phase is None:
        raise SkipCheck(
            unrecorded(
                ctx,
                "no output logits were recorded (the model's output is not a float tensor, .logits or tuple whose "
                "last axis has ≥ 2 entries), or the run predates the output probe",
            )
        )
    w = wide(ctx, NAMES, phase, agg="first")
    shift = ctx.signal("z_grad_shift", "train")
    shift = {str(k): finite_median(v.value) for k, v in shift.groupby("layer", sort=False)} if len(shift) else {}
    not_logits = {k: v for k, v in shift.items() if v > t["shift_max"]}
    if not_logits and set(w.layer.astype(str)) <= set(not_logits):
        raise SkipCheck(
            f"the loss is not blind to a constant added to the output (|Σ_j ∂L/∂z_j| / Σ_j |∂L/∂z_j| = "
            f"{num(max(not_logits.values()))} > {num(t['shift_max'])}): a regression or sigmoid output, not softmax "
            f"logits whose log Z could drift"
        )
    out = []
    for layer, d in w.groupby("layer", sort=False):
        if str(layer) in not_logits:
            continue
        steps = d.step.to_numpy()
        lz = d.logz_mean.to_numpy(dtype=np.float64)
        if not np.isfinite(lz).any():
            continue
        end, w0 = end_window(ctx, lz, t["window_frac"], t["min_window_steps"])
        first = float(lz[0])
        drift = end - first
        if abs(drift) < t["drift"] or abs(end) < t["abs_warn"]:
            continue
        sev = "error" if abs(end) >= t["error"] else "warning"
        at_init = abs(first) >= t["abs_warn"]  # too large from the start: the initialisation's scale, not a drift
        if at_init:
            sev = "info"
        zmax = d.z_absmax.to_numpy(dtype=np.float64)
        zmean = d.z_mean.to_numpy(dtype=np.float64)
        ev = {
            "logz_end": end, "score": abs(end), "logz_first": first, "drift": drift,
            "logz_std_end": float(np.nanmean(d.logz_std.to_numpy(dtype=np.float64)[w0:])),
            "z_absmax_first": float(zmax[0]), "z_absmax_end": float(np.nanmean(zmax[w0:])),
            "z_mean_first": float(zmean[0]), "z_mean_end": float(np.nanmean(zmean[w0:])),
            "window_steps": [int(steps[w0]), int(steps[-1])], "phase": phase, "series": thin(steps, lz),
            "grad_shift_sensitivity": shift.get(str(layer)),
            "thresholds": {k: t[k] for k in ("drift", "abs_warn", "error")},
        }  # fmt: skip
        msg = (
            f"The output logits' mean log Σ exp(z) is {num(end)} at the end of training, {num(first)} at step "
            f"{int(steps[0])} ({'+' if drift > 0 else ''}{num(drift)} nats); max |z| went from {num(zmax[0])} to "
            f"{num(ev['z_absmax_end'])}."
        )
        if at_init:
            msg += " The logits were already that large at the first sampled step: see the initialisation's scale."
        ev["at_init"] = at_init
        out.append(Finding(ID, sev, layer, (int(steps[w0]), int(steps[-1])), msg, ev, REC))
    return out
