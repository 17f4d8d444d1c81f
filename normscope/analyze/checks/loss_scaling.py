"""loss-scaling: how often a GradScaler skipped the optimizer step, and where its loss scale went.

What it measures, why it matters and how to fix it: docs/checks/loss-scaling.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num, pct
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "loss-scaling"

_FIX = ("Find what overflows: if non-finite names a module in the forward pass, an activation there exceeds fp16's "
        "range (65504) and no loss scale can help; otherwise the gradients themselves do (a loss summed over many "
        "elements, regression targets far from unit scale, a learning rate so high the weights grew). Use "
        "reduction='mean' and standardised targets, lower the learning rate or clip the gradients after "
        "scaler.unscale_(optimizer); where the hardware has it, autocast to bfloat16 (fp32's range: no loss scaling, "
        "no skipped steps).")  # fmt: skip


def amp_series(ctx: Context):
    """The sampled steps' (step, loss_scale, skipped, skipped_total) from the scalars table, sorted."""
    sc = ctx.scalars
    if not len(sc):
        return None
    d = sc[sc.phase == "amp"]
    if not len(d):
        return None
    w = d.pivot_table(index="step", columns="name", values="value", aggfunc="last").sort_index()
    for col in ("loss_scale", "skipped", "skipped_total"):
        if col not in w:
            w[col] = np.nan
    return w


@register(
    id=ID, severity="warning",
    summary="A GradScaler (fp16 mixed precision) skipped many optimizer steps, or its loss scale fell below 1: the gradients overflow fp16.",
    needs=("training",),
    thresholds={"skip_warn": 0.05, "skip_error": 0.5, "min_scale": 1.0, "last_frac": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    w = amp_series(ctx)
    if w is None:
        raise SkipCheck("no loss scaler stepped the optimizer (no GradScaler in the run)")
    steps = w.index.to_numpy(np.int64)
    total = w.skipped_total.to_numpy(float)
    scale = w.loss_scale.to_numpy(float)
    amp = ctx.meta.get("amp") or {}
    seen = int(ctx.meta.get("steps_seen") or steps[-1] + 1)
    skipped_all = int(amp.get("skipped_steps", total[-1] if np.isfinite(total[-1]) else 0))
    # the window: the second half of the sampled steps; its skip rate from the running count
    cut = steps[min(len(steps) - 1, int(np.floor((1 - t["last_frac"]) * len(steps))))]
    a = int(np.searchsorted(steps, cut))
    if a > 0:
        span = (int(steps[a - 1]) + 1, int(steps[-1]))  # the running count's difference: steps[a-1] + 1 … last
        n_win = steps[-1] - steps[a - 1]
        k_win = total[-1] - total[a - 1]
    else:
        span = (0, int(steps[-1]))
        n_win = steps[-1] + 1
        k_win = total[-1]
    frac = float(k_win / n_win) if n_win > 0 and np.isfinite(k_win) else float("nan")
    fin = scale[np.isfinite(scale)]
    last, first = (float(fin[-1]), float(fin[0])) if fin.size else (float("nan"), float("nan"))
    low = float(fin[a:].min()) if fin[a:].size else last
    ev = {"skipped_steps": skipped_all, "steps": seen, "window_steps": list(span), "window_skipped": k_win,
          "window_skip_fraction": frac, "loss_scale_first": first, "loss_scale_last": last,
          "loss_scale_min_window": low, "scaler": amp, "thresholds": dict(t)}  # fmt: skip
    if skipped_all == 0 and not (np.isfinite(last) and last < t["min_scale"]):
        return []
    below = np.isfinite(last) and last < t["min_scale"]
    shrink = (f" The scale is now below {num(t['min_scale'])}: the scaler shrinks the loss, because the gradients "
              f"overflow fp16 even unscaled, and small gradients underflow to zero instead.")  # fmt: skip
    if np.isfinite(frac) and frac >= t["skip_warn"]:
        sev = "error" if frac >= t["skip_error"] else "warning"
        msg = (f"The loss scaler skipped {pct(frac)} of the optimizer steps over steps {span[0]}–{span[1]} "
               f"({num(k_win)} of {num(n_win)}; {skipped_all} of {seen} in the whole run): at each, the gradients held "
               f"Inf/NaN and the weights did not move"
               + (", so the model has all but stopped training" if sev == "error" else "")
               + f". The loss scale went from {num(first)} to {num(last)}." + (shrink if below else ""))  # fmt: skip
        return [Finding(ID, sev, None, span, msg, ev, _FIX)]
    if below:
        msg = (f"The loss scale fell to {num(last)} (from {num(first)}; {skipped_all} of {seen} steps skipped)."
               + shrink)  # fmt: skip
        return [Finding(ID, "warning", None, span, msg, ev, _FIX)]
    msg = (f"The loss scaler skipped {skipped_all} of {seen} optimizer steps (Inf/NaN gradients; {num(k_win)} over "
           f"steps {span[0]}–{span[1]}); the scale went from {num(first)} to {num(last)}. Expected: a dynamic "
           f"scaler halves the scale at each overflow while it finds its level, then skips about once per growth "
           f"interval as it probes upward. The gradients recorded at skipped steps are left out of the gradient "
           f"checks.")  # fmt: skip
    return [Finding(ID, "info", None, span, msg, ev, "Nothing to do.")]
