"""attention-logit-growth: the largest pre-softmax attention logit grows without bound.

The collector's transformer probe measures, per attention module and sampled step, the largest
|q·k|·scale over a subsample of positions (normscope.collect.attention). Dehghani et al. 2023
(ViT-22B) and Wortsman et al. 2023 saw this logit grow before the loss diverged, the attention
collapsing to one-hot. Flags a logit above ``warn`` at the end, or one that grew ``growth``×
over the run to at least ``growth_min``."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._transformer import end_window, signal_phase, thin, unrecorded, wide
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "attention-logit-growth"
NAMES = ("attn_logit_max", "attn_logit_head_mean", "attn_logit_bound", "attn_rotary")

REC = (
    "Normalise queries and keys before the dot product (QK-LayerNorm: a LayerNorm or RMSNorm on q and k "
    "per head, Dehghani et al. 2023; Wortsman et al. 2023 show it removes this instability across learning "
    "rates), lower the learning rate or lengthen its warmup; keep weight decay on the q/k projections."
)


@register(
    id=ID, severity="error",
    summary="The largest attention logit q·k/√d of an attention block grows over training (towards one-hot attention and divergence).",
    needs=("training",),
    thresholds={"warn": 50.0, "error": 500.0, "growth": 10.0, "growth_min": 20.0, "window_frac": 0.1,
                "min_window_steps": 3},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    phase = signal_phase(ctx, "attn_logit_max")
    if phase is None:
        raise SkipCheck(
            unrecorded(
                ctx,
                "no attention block was recognised (nn.MultiheadAttention, q/k projections or a fused c_attn; "
                "docs/roles.md), or the run predates the attention probe",
            )
        )
    w = wide(ctx, NAMES, phase)
    specs = (ctx.meta.get("transformer") or {}).get("attention") or {}
    out = []
    for layer, d in w.groupby("layer", sort=False):
        steps = d.step.to_numpy()
        v = d.attn_logit_max.to_numpy(dtype=np.float64)
        if not np.isfinite(v).any():
            continue
        end, w0 = end_window(ctx, v, t["window_frac"], t["min_window_steps"])
        fin = np.flatnonzero(np.isfinite(v))
        first = float(v[fin[0]])
        # growth against a floor of 1: a zero-initialised query projection (muP) starts at logit 0
        growth = end / max(first, 1.0)
        ipk = int(np.nanargmax(v))
        by_growth = growth >= t["growth"] and end >= t["growth_min"]
        if end < t["warn"] and not by_growth:
            continue
        sev = "error" if end >= t["error"] else "warning"
        # large from the start (a pretrained model) and not growing: info, unless past the error level
        at_init = first >= t["warn"] and not by_growth and end < t["error"]
        if at_init:
            sev = "info"
        spec = specs.get(layer, {})
        ev = {
            "logit_end": end, "score": end, "logit_first": first, "logit_peak": float(v[ipk]),
            "peak_step": int(steps[ipk]), "growth": growth,
            "head_mean_end": float(np.nanmean(d.attn_logit_head_mean.to_numpy(dtype=np.float64)[w0:])),
            "bound_end": float(np.nanmean(d.attn_logit_bound.to_numpy(dtype=np.float64)[w0:])),
            "rotary_applied": bool(np.nanmax(d.attn_rotary.to_numpy(dtype=np.float64)) > 0),
            "window_steps": [int(steps[w0]), int(steps[-1])], "phase": phase, "spec": spec,
            "series": thin(steps, v), "thresholds": {k: t[k] for k in ("warn", "error", "growth", "growth_min")},
            "at_init": at_init,
        }  # fmt: skip
        why = f"above {num(t['warn'])}" if end >= t["warn"] else f"{num(growth)}× its value at step {int(steps[0])}"
        msg = (
            f"The largest attention logit of {layer} is {num(end)} at the end of training ({why}; it was "
            f"{num(first)} at step {int(steps[0])}, peak {num(v[ipk])} at step {int(steps[ipk])}): a softmax over "
            "logits this large is close to one-hot."
        )
        if at_init:
            msg += (" It was already that large at the first sampled step and did not grow "
                    f"{num(t['growth'])}×: a trained model's attention, to watch rather than fix.")  # fmt: skip
        out.append(Finding(ID, sev, layer, (int(steps[w0]), int(steps[-1])), msg, ev, REC))
    return out
