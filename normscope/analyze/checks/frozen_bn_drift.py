"""frozen-bn-drift: BatchNorm layers whose affine parameters do not train, left in train mode, so
their running statistics drift to the fine-tuning data.

The collector (:mod:`normscope.collect.modes`) finds BatchNorm layers with running statistics
whose affine parameters do not train (``requires_grad=False``, ``affine=False``, or in no
optimizer param group), snapshots their running statistics when the scope starts, and on sampled
steps emits their drift as signals: ``bn_mean_drift`` (RMS over channels of |μ − μ₀|/σ₀),
``bn_mean_drift_max``, ``bn_var_log_ratio`` (mean over channels of log σ²/σ₀²),
``bn_var_log_ratio_max`` and ``bn_train_forwards`` (training forwards of the step with the layer
in train mode)."""

from __future__ import annotations

import math

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "frozen-bn-drift"
SIGNALS = ("bn_mean_drift", "bn_mean_drift_max", "bn_var_log_ratio", "bn_var_log_ratio_max", "bn_train_forwards")

FIX = (
    "Keep frozen BatchNorm layers in eval mode while fine-tuning: after every model.train(), call .eval() on "
    "each BatchNorm whose parameters are frozen (or replace them with a frozen BN such as "
    "torchvision.ops.FrozenBatchNorm2d), so they keep the pre-trained population statistics (Ioffe & Szegedy "
    "2015: inference uses the population statistics). If the layers should adapt to the new data, do it on "
    "purpose: unfreeze their affine parameters, or re-estimate the statistics on the new data once (AdaBN, "
    "Li et al. 2016)."
)


def drift_table(ctx: Context):
    """Per frozen BN layer: the signals over sampled steps (a DataFrame, columns = signal names)."""
    s = ctx.signals
    s = ctx._finite(s[(s.phase == "train") & s.name.isin(SIGNALS)])  # before the first NaN/Inf
    if not len(s):
        return None
    return s.pivot_table(index=["layer", "step"], columns="name", values="value", aggfunc="last").reset_index()


@register(
    id=ID, severity="warning",
    summary="BatchNorm layers with frozen affine parameters left in train mode: their running statistics drift to the fine-tuning batches.",
    needs=("modes", "training"),
    thresholds={"mean_warn": 0.1, "var_low": 0.8, "var_high": 1.25},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    frozen = ctx.meta["modes"].get("frozen_bn") or {}
    if not frozen:
        raise SkipCheck("no BatchNorm layer with frozen affine parameters (requires_grad=False, affine=False, "
                        "or in no optimizer param group)")  # fmt: skip
    tab = drift_table(ctx)
    if tab is None:
        raise SkipCheck(
            "no running-statistics drift recorded for the frozen BatchNorm layers (no sampled training step)"
        )
    lo, hi = math.log(t.var_low), math.log(t.var_high)
    out = []
    for layer, d in tab.groupby("layer", sort=False):
        if layer not in frozen:
            continue
        d = d.sort_values("step")
        in_train = int(np.nansum(d["bn_train_forwards"].to_numpy()))
        if in_train == 0:
            continue  # kept in eval mode: its statistics do not move
        last = d.iloc[-1]
        mean_rms, mean_max = float(last["bn_mean_drift"]), float(last["bn_mean_drift_max"])
        lvar, lvar_max = float(last["bn_var_log_ratio"]), float(last["bn_var_log_ratio_max"])
        ratio = math.exp(lvar)
        drifted = mean_rms > t.mean_warn or not (lo <= lvar <= hi)
        ch = ctx.modules.get(layer, {}).get("num_features")
        msg = (f"BatchNorm {layer} does not train ({frozen[layer]}) but ran in train mode in {in_train} sampled "
               f"training forward(s): since the run started its running mean moved {num(mean_rms)}σ (RMS over "
               f"{ch or 'its'} channels; at most {num(mean_max)}σ) and its running variance changed ×{num(ratio)} "
               f"(geometric mean; the worst channel off by a factor of {num(math.exp(lvar_max))})")  # fmt: skip
        if drifted:
            msg += " — the pre-trained normalisation is being replaced by the fine-tuning batches' statistics."
        else:
            msg += (
                f", still within {num(t.mean_warn)}σ and ×[{num(t.var_low)}, {num(t.var_high)}]; in train mode they "
                "follow every fine-tuning batch."
            )
        out.append(Finding(
            ID, "warning" if drifted else "info", layer, (int(d.step.iloc[0]), int(d.step.iloc[-1])), msg,
            {"why_frozen": frozen[layer], "train_mode_forwards": in_train, "mean_drift_sigma": mean_rms,
             "mean_drift_sigma_max": mean_max, "var_ratio": ratio, "var_log_ratio_max": lvar_max,
             "steps": [int(s) for s in d.step], "mean_drift_series": [float(v) for v in d["bn_mean_drift"]],
             "score": max(mean_rms / t.mean_warn, abs(lvar) / max(hi, -lo)),
             "thresholds": {"mean_warn": t.mean_warn, "var_low": t.var_low, "var_high": t.var_high}},
            FIX,
        ))  # fmt: skip
    return out
