"""stale-running-stats: BatchNorm running mean/var that no longer match the population statistics of the data (and a train/eval output gap).

What it measures, why it matters and how to fix it: docs/checks/stale-running-stats.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._bn import _bn_train_batch, _pass, dropouts_upstream
from normscope.analyze.checks._util import num, pct
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import (
    stale_stats,
)
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "stale-running-stats"


@register(
    id=ID, severity="warning",
    summary="BatchNorm running mean/var that no longer match the population statistics of the data (and a train/eval output gap).",
    needs=("training", "probe-bn"),
    thresholds={"mean_sigma": 0.1, "var_lo": 0.8, "var_hi": 1.25, "channel_frac": 0.5, "output_gap": 0.25,
            "small_batch": 16},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    bn = ctx.probe["bn"]  # the "probe-bn" need guarantees it
    g = ctx.graph
    out = []
    flagged = []
    skipped_small = []
    judged = 0
    for name, b in bn.items():
        if not b.get("track_running_stats", True) or b.get("running_mean") is None:
            continue
        batch = b.get("batch") or _bn_train_batch(ctx, name)
        if batch is not None and batch < t["small_batch"]:
            skipped_small.append(name)  # small-batch-bn reports these, with the running-stat error
            continue
        data = "eval" if _pass(b, "eval/eval") is not None else "train"
        drop_up = False
        if g is not None:
            drop_up = any(dropouts_upstream(ctx, g, n, through_norms=True) for n in g.module_nodes(name))
        key = f"{data}/drop" if drop_up and _pass(b, f"{data}/drop") is not None else f"{data}/eval"
        pop = _pass(b, key)
        if pop is None:
            continue
        judged += 1
        rm, rv = np.asarray(b["running_mean"], float), np.asarray(b["running_var"], float)
        eps = float(b.get("eps", 1e-5))
        dmu, ratio = stale_stats(rm, rv, pop[0], pop[1], eps)
        live = (pop[1] > 10 * eps) | (rv > 10 * eps)
        if not live.any():
            continue
        bad = ((dmu > t["mean_sigma"]) | (ratio < t["var_lo"]) | (ratio > t["var_hi"])) & live
        frac = float(bad[live].mean())
        if frac < t["channel_frac"]:
            continue
        flagged.append(name)
        ev = {"population": key, "channels": int(live.sum()), "stale_channels": int(bad.sum()), "stale_fraction": frac,
              "mean_shift_sigma_median": float(np.median(dmu[live])), "mean_shift_sigma_max": float(np.max(dmu[live])),
              "var_ratio_median": float(np.median(ratio[live])), "var_ratio_min": float(np.min(ratio[live])),
              "var_ratio_max": float(np.max(ratio[live])), "dropout_upstream": drop_up,
              "thresholds": {k: t[k] for k in ("mean_sigma", "var_lo", "var_hi", "channel_frac")}}  # fmt: skip
        gap = ctx.probe.get("bn_gap") or {}
        if gap.get("rel_gap") is not None:
            ev["train_eval_output_gap"] = gap["rel_gap"]
        src = "the eval data" if data == "eval" else "the training data"
        msg = (f"{name}'s running statistics do not match {src} (recomputed with {'dropout on, as in training' if key.endswith('drop') else 'dropout off'}): "
               f"{pct(frac)} of channels are off (median mean shift {num(ev['mean_shift_sigma_median'])} σ, median "
               f"running/population variance ratio {num(ev['var_ratio_median'])}).")  # fmt: skip
        rec = (
            "Recalibrate the BN statistics on data from the distribution you evaluate on (normscope.recalibrate_bn: "
            "a PreciseBN-style pass with equal weight per sample and dropout off), or check why the data changed "
            "between training and evaluation; a very small or very large BN momentum also leaves stale statistics."
        )
        out.append(Finding(ID, "warning", name, None, msg, ev, rec))
    gap = ctx.probe.get("bn_gap") or {}
    if not flagged and judged and gap.get("rel_gap") is not None and gap["rel_gap"] > t["output_gap"]:
        msg = (
            f"The model's outputs differ by {pct(gap['rel_gap'])} (relative L2) between train-mode BatchNorm (batch "
            f"statistics) and eval mode (running statistics) on {gap.get('samples')} samples of the {gap.get('data')} data."
        )
        rec = "Recalibrate BN statistics (normscope.recalibrate_bn) on data like the evaluation data."
        out.append(Finding(ID, "warning", None, None, msg, dict(gap, threshold=t["output_gap"]), rec))
    if not judged and not out:
        if skipped_small:
            raise SkipCheck(
                f"every BatchNorm sees fewer than {t['small_batch']} samples per batch: small-batch-bn reports them"
            )
        raise SkipCheck("no BatchNorm layer tracks running statistics")
    return out
