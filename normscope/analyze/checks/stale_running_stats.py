"""stale-running-stats: BatchNorm running mean/var that no longer match the population statistics of the data (and a train/eval output gap).

What it measures, why it matters and how to fix it: docs/checks/stale-running-stats.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._bn import _bn_train_batch, _pass, dropouts_upstream, frozen_kept_in_eval
from normscope.analyze.checks._util import num, pct, stack
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import bn_running_ema, stale_stats
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "stale-running-stats"


def _lag_only(ctx, name: str, b: dict, rm, rv, eps: float, t) -> dict | None:
    """Is the running statistics' mismatch EMA lag? Rebuild the running statistics from the batch
    statistics the layer actually saw (the collector's BN-input rows); when the real ones match
    that rebuild, BN did exactly what it should with the data it saw, and the distance to the
    population comes from weights that moved since (early training), not from stale statistics.
    Returns the comparison, or None when the rows cannot tell (not every step recorded, no rows)."""
    tr = ctx.train
    d = tr[(tr.layer == name) & (tr.output == "input") & (tr.call == 0)].sort_values("step") if len(tr) else tr
    if len(d) < 2:
        return None
    steps = d.step.to_numpy()
    if steps[0] != 0 or (np.diff(steps) > 1).any():
        return None  # sparse sampling: the rebuild would be an approximation; stay with the population test
    means, vars_ = stack(d.ch_mean), stack(d.ch_var)
    if means.shape[1] != rm.size or (d.forwards.to_numpy() != 1).any():
        return None
    counts = d["count"].to_numpy(float) / rm.size
    momentum = b.get("momentum", 0.1)
    # the share of the initial (0, 1) statistics still in the average: a momentum too small for the run
    # leaves the statistics stale by construction, which is no lag
    init_weight = 0.0 if momentum is None else (1.0 - float(momentum)) ** (int(steps[-1]) + 1)
    ema_m, ema_v = bn_running_ema(means, vars_, counts, momentum, steps)
    dmu, ratio = stale_stats(rm, rv, ema_m, ema_v, eps)
    live = (ema_v > 10 * eps) | (rv > 10 * eps)
    off = ((dmu > t["mean_sigma"]) | (ratio < t["var_lo"]) | (ratio > t["var_hi"])) & live
    frac = float(off[live].mean()) if live.any() else 0.0
    return {"lag_only": frac < t["channel_frac"] and init_weight < 0.05, "off_vs_seen_batches": frac,
            "init_weight_in_running": init_weight,
            "mean_shift_sigma_vs_seen_median": float(np.median(dmu[live])) if live.any() else 0.0}  # fmt: skip


def _mismatch(rm, rv, pop, eps, t):
    dmu, ratio = stale_stats(rm, rv, pop[0], pop[1], eps)
    live = (pop[1] > 10 * eps) | (rv > 10 * eps)
    bad = ((dmu > t["mean_sigma"]) | (ratio < t["var_lo"]) | (ratio > t["var_hi"])) & live
    return dmu, ratio, live, bad


def _mode_cause(ctx: Context) -> str | None:
    """What the collector's mode audit says happened to the running statistics, if anything."""
    ev = (ctx.meta.get("modes") or {}).get("events") or {}
    if (ev.get("train-in-eval-mode") or {}).get("bn_eval", 0) > 0:
        return "training ran with the model in eval mode, so BatchNorm never updated its running statistics"
    if any(k.startswith("eval-in-train-mode:") and e.get("bn_train", 0) > 0 for k, e in ev.items()):
        return "evaluation forwards ran with BatchNorm in train mode and updated its running statistics on evaluation batches"
    return None


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
    lagging = []
    kept_frozen = frozen_kept_in_eval(ctx)
    cause = _mode_cause(ctx)
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
        dmu, ratio, live, bad = _mismatch(rm, rv, pop, eps, t)
        if not live.any():
            continue
        frac = float(bad[live].mean())
        if frac < t["channel_frac"]:
            continue
        # stale, or only lagging? Lag: the running statistics equal the EMA of the batches BN saw, and
        # (for eval data) the eval population is the training population (no distribution shift).
        lag = _lag_only(ctx, name, b, rm, rv, eps, t)
        shift = None
        train_pop = _pass(b, key.replace("eval/", "train/", 1)) if data == "eval" else None
        if train_pop is not None:
            _, _, live2, shifted = _mismatch(pop[0], pop[1], train_pop, eps, t)
            shift = float(shifted[live2].mean()) if live2.any() else 0.0
        is_lag = lag is not None and lag["lag_only"] and (shift is None or shift < t["channel_frac"])
        severity = "info" if is_lag else "warning"
        (lagging if is_lag else flagged).append(name)
        ev = {"population": key, "channels": int(live.sum()), "stale_channels": int(bad.sum()), "stale_fraction": frac,
              "mean_shift_sigma_median": float(np.median(dmu[live])), "mean_shift_sigma_max": float(np.max(dmu[live])),
              "var_ratio_median": float(np.median(ratio[live])), "var_ratio_min": float(np.min(ratio[live])),
              "var_ratio_max": float(np.max(ratio[live])), "dropout_upstream": drop_up,
              "thresholds": {k: t[k] for k in ("mean_sigma", "var_lo", "var_hi", "channel_frac")},
              "score": frac}  # fmt: skip
        if lag is not None:
            ev.update(lag)
        if shift is not None:
            ev["eval_vs_train_population_off_fraction"] = shift
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
        if cause and not is_lag:
            msg += f" Cause seen by the mode audit: {cause} (eval-in-train-mode)."
            ev["mode_cause"] = cause
        if name in kept_frozen and not is_lag:
            severity = "info"
            msg = (f"{name} is frozen on purpose (its affine parameters do not train and it stayed in eval mode), "
                   f"so it keeps its pre-trained statistics; they differ from {src}: {pct(frac)} of channels are off "
                   f"(median mean shift {num(ev['mean_shift_sigma_median'])} σ, median running/population variance "
                   f"ratio {num(ev['var_ratio_median'])}) — expected when the new data differ from the pre-training "
                   f"data.")  # fmt: skip
            rec = (
                "Nothing to do while the backbone stays frozen. If accuracy on the new domain suffers, re-estimate "
                "the statistics on it once (normscope.recalibrate_bn; AdaBN, Li et al. 2016) or unfreeze the layer."
            )
            ev["frozen_on_purpose"] = True
        if is_lag:
            msg = (f"{name}'s running statistics lag the current weights: {pct(frac)} of channels differ from "
                   f"{src} recomputed now, yet they are the exponential average of the batches the layer saw "
                   f"(weights still moving fast, as early in training) — not stale.")  # fmt: skip
            rec = (
                "Nothing is wrong with BN itself. Before evaluating a model stopped this early, re-estimate the "
                "statistics with the final weights (normscope.recalibrate_bn); with more training the lag fades."
            )
        out.append(Finding(ID, severity, name, None, msg, ev, rec))
    gap = ctx.probe.get("bn_gap") or {}
    if not flagged and not lagging and judged and gap.get("rel_gap") is not None and gap["rel_gap"] > t["output_gap"]:
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
