"""stale-running-stats: BatchNorm running mean/var that no longer match the population statistics of the data (and a train/eval output gap).

What it measures, why it matters and how to fix it: docs/checks/stale-running-stats.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._bn import _bn_train_batch, _pass, dropouts_upstream, frozen_kept_in_eval
from normscope.analyze.checks._util import num, pct, stack
from normscope.analyze.checks.bn_momentum import MAX_MOMENTUM, inverted
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import bn_merge_error, bn_running_ema, stale_stats
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "stale-running-stats"
REC_LAG = (
    "Nothing is wrong with BN itself. Before evaluating a model stopped this early, re-estimate the "
    "statistics with the final weights (normscope.recalibrate_bn); with more training the lag fades."
)
REC_UNTOLD = (
    "For a verdict, probe with every step recorded (every=1, or a smaller --every). Either way, "
    "re-estimate the statistics with the final weights before evaluating (normscope.recalibrate_bn)."
)


def _init_weight(momentum, steps_run: int) -> float:
    """The share of the initial (0, 1) statistics still in the running average after ``steps_run``
    forwards: a momentum too small for the run leaves the statistics stale by construction, which is no lag."""
    return 0.0 if momentum is None else (1.0 - float(momentum)) ** steps_run


def _lag_only(ctx, name: str, b: dict, rm, rv, eps: float, t, steps_run: int, pop_var=None) -> dict | None:
    """Is the running statistics' mismatch EMA lag? Rebuild the running statistics from the batch
    statistics the layer actually saw (the collector's BN-input rows); when the real ones match
    that rebuild, BN did exactly what it should with the data it saw, and the distance to the
    population comes from weights that moved since (early training), not from stale statistics.

    With every step recorded the rebuild is exact. Under sparser sampling the steps between rows
    are interpolated, and each channel's tolerance widens by three times the rebuild's own error
    bound (formulas.bn_running_ema); ``lag_only`` is None (cannot tell) when that bound is as
    large as the mismatch the check flags. Returns None when the rows cannot be used at all (no
    rows, a first row after step 0, a step with another number of BN forwards than the others).

    Gradient accumulation (K forwards of the layer per step, one merged row): BN updated its
    running statistics K times a step, each with one micro-batch; the rebuild runs K updates per
    step with the merged moments. What the merge hides widens the tolerance (formulas.bn_merge_error),
    and when that is as large as the mismatch the check flags, ``lag_only`` is None."""
    tr = ctx.train
    d = tr[(tr.layer == name) & (tr.output == "input") & (tr.call == 0)].sort_values("step") if len(tr) else tr
    if len(d) < 1:
        return None
    steps = d.step.to_numpy()
    if steps[0] != 0 or steps[-1] >= steps_run or (np.diff(steps) <= 0).any():
        return None  # the rows do not start where the running statistics did (or repeat a step)
    means, vars_ = stack(d.ch_mean), stack(d.ch_var)
    fw = d.forwards.to_numpy()
    if means.shape[1] != rm.size or fw[0] < 1 or (fw != fw[0]).any():
        return None
    k = int(fw[0])
    counts = d["count"].to_numpy(float) / rm.size / k  # elements per channel in one micro-batch
    momentum = b.get("momentum", 0.1)
    init_weight = _init_weight(momentum, steps_run * k)
    every_step = len(steps) == steps_run
    if k > 1:  # K updates a step: forward index k·step + j, each with the step's merged moments
        steps = (steps[:, None] * k + np.arange(k)).reshape(-1)
        means, vars_, counts = (np.repeat(a, k, axis=0) for a in (means, vars_, counts))
    ema_m, ema_v, sd_m, sd_v = bn_running_ema(means, vars_, counts, momentum, steps, until=steps_run * k)
    dmu, ratio = stale_stats(rm, rv, ema_m, ema_v, eps)
    live = (ema_v > 10 * eps) | (rv > 10 * eps)
    if pop_var is not None:  # the channels the check judged against the population are judged here too
        live |= np.asarray(pop_var, float) > 10 * eps
    ev = {"rebuild": "every step recorded" if every_step else f"{len(d)} of {steps_run} steps recorded, the rest interpolated",
          "init_weight_in_running": init_weight}  # fmt: skip
    merge_m = merge_v = 0.0
    if k > 1:
        micro = float(np.median(d.samples.to_numpy(float))) / k
        merge_m, merge_v = bn_merge_error(momentum, k, micro)
        ev.update(forwards_per_step=k, micro_batch=micro, merge_error_sigma=merge_m, merge_error_var=merge_v)
    if not live.any():
        return dict(ev, lag_only=None)
    with np.errstate(invalid="ignore", divide="ignore"):
        err_m = sd_m / np.sqrt(ema_v + eps) + merge_m  # the rebuild's error bound, in σ units
        err_v = sd_v / (ema_v + eps) + merge_v  # and relative to the variance
    ev["rebuild_error_sigma_median"] = float(np.median(err_m[live]))
    if (not every_step or k > 1) and not (
        np.median(err_m[live]) <= t["mean_sigma"] and np.median(err_v[live]) <= 1 - t["var_lo"]
    ):
        return dict(ev, lag_only=None)  # too few rows to rebuild the average to the precision the check judges at
    tol_m, tol_v = 3 * err_m, 3 * err_v
    off = ((dmu > t["mean_sigma"] + tol_m) | (ratio < t["var_lo"] - tol_v) | (ratio > t["var_hi"] + tol_v)) & live
    frac = float(off[live].mean())
    return dict(ev, lag_only=frac < t["channel_frac"] and init_weight < 0.05, off_vs_seen_batches=frac,
                mean_shift_sigma_vs_seen_median=float(np.median(dmu[live])))  # fmt: skip


def _verdict(ctx, name, b, rm, rv, eps, key, data, pop, t, steps_run, cause):
    """Stale, or only lagging? Lag: the running statistics equal the EMA of the batches BN saw, and
    (for eval data) the eval population is the training population (no distribution shift).
    Returns (the rebuild's evidence, the eval-vs-train shift, lag, cannot tell): "cannot tell" when
    the rows are too sparse for the rebuild and no cause of staleness was seen."""
    lag = _lag_only(ctx, name, b, rm, rv, eps, t, steps_run, pop_var=pop[1])
    shift = None
    train_pop = _pass(b, key.replace("eval/", "train/", 1)) if data == "eval" else None
    if train_pop is not None:
        _, _, live2, shifted = _mismatch(pop[0], pop[1], train_pop, eps, t)
        shift = float(shifted[live2].mean()) if live2.any() else 0.0
    no_shift = shift is None or shift < t["channel_frac"]
    is_lag = lag is not None and bool(lag["lag_only"]) and no_shift
    untold = (lag is not None and lag["lag_only"] is None and no_shift and not cause
              and lag["init_weight_in_running"] < 0.05)  # fmt: skip
    return lag, shift, is_lag, untold


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


def _gap_finding(ctx, gap: dict, below: list, t, steps_run: int, cause) -> Finding:
    """The train-mode/eval-mode output gap, with no BN flagged on its own. Lag when every judged
    BN's running statistics are the average of the batches it saw (small per-layer lags add up
    over depth, early in training): info, like a lagging layer; likewise when the rows are too
    sparse to tell and no cause of staleness was seen. Otherwise a warning."""
    verdicts = [_verdict(ctx, *layer, t, steps_run, cause) for layer in below]
    lag_all = bool(verdicts) and all(v[2] for v in verdicts)
    untold = bool(verdicts) and not lag_all and all(v[2] or v[3] for v in verdicts)
    ev = dict(gap, threshold=t["output_gap"], layers_judged=len(verdicts),
              layers_lagging=sum(bool(v[2]) for v in verdicts))  # fmt: skip
    msg = (
        f"The model's outputs differ by {pct(gap['rel_gap'])} (relative L2) between train-mode BatchNorm (batch "
        f"statistics) and eval mode (running statistics) on {gap.get('samples')} samples of the {gap.get('data')} data."
    )
    rec = "Recalibrate BN statistics (normscope.recalibrate_bn) on data like the evaluation data."
    if lag_all:
        ev["lag_only"] = True
        msg += (" Yet every BatchNorm's running statistics are the exponential average of the batches it saw: "
                "small per-layer lags behind weights still moving (as early in training) add up over depth — not stale.")  # fmt: skip
        rec = REC_LAG
    elif untold:
        ev["lag_undetermined"] = True
        msg += (" This run recorded too few steps to tell lag behind moving weights from staleness, and no cause "
                "of staleness was seen.")  # fmt: skip
        rec = REC_UNTOLD
    return Finding(ID, "info" if lag_all or untold else "warning", None, None, msg, ev, rec)


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
    below = []  # judged layers under the flag threshold
    steps_run = int(ctx.probe.get("steps_run") or (int(ctx.train.step.max()) + 1 if len(ctx.train) else 0))
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
            below.append((name, b, rm, rv, eps, key, data, pop))  # (the output gap asks about these too)
            continue
        lag, shift, is_lag, untold = _verdict(ctx, name, b, rm, rv, eps, key, data, pop, t, steps_run, cause)
        severity = "info" if is_lag or untold else "warning"
        (lagging if is_lag or untold else flagged).append(name)
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
        if untold and name not in kept_frozen:
            msg = (f"{name}'s running statistics differ from {src} recomputed now: {pct(frac)} of channels are off "
                   f"(median mean shift {num(ev['mean_shift_sigma_median'])} σ). The rebuild from this run's rows "
                   f"({lag['rebuild']}) is too coarse to tell whether they are the average of the batches the layer saw (lag behind weights "
                   f"still moving, as early in training) or stale. No cause of staleness was seen: the mode audit "
                   f"is clean, the momentum is not too small"
                   f"{', the eval data match the training data' if shift is not None else ''}.")  # fmt: skip
            rec = REC_UNTOLD
            ev["lag_undetermined"] = True
        if cause and not is_lag:
            msg += f" Cause seen by the mode audit: {cause} (eval-in-train-mode)."
            ev["mode_cause"] = cause
        momentum = b.get("momentum", 0.1)
        if inverted(momentum, MAX_MOMENTUM) and not is_lag:
            msg += (f" Its momentum {momentum:g} makes them the last batch's statistics alone (bn-momentum: "
                    f"TensorFlow's decay convention, {num(1 - momentum)} in PyTorch's).")  # fmt: skip
            ev["momentum_inverted"] = momentum
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
            rec = REC_LAG
        out.append(Finding(ID, severity, name, None, msg, ev, rec))
    gap = ctx.probe.get("bn_gap") or {}
    if not flagged and not lagging and judged and gap.get("rel_gap") is not None and gap["rel_gap"] > t["output_gap"]:
        out.append(_gap_finding(ctx, gap, below, t, steps_run, cause))
    if not judged and not out:
        if skipped_small:
            raise SkipCheck(
                f"every BatchNorm sees fewer than {t['small_batch']} samples per batch: small-batch-bn reports them"
            )
        raise SkipCheck("no BatchNorm layer tracks running statistics")
    return out
