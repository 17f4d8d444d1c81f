"""BatchNorm checks: dropout-bn-variance-shift, small-batch-bn, stale-running-stats, syncbn-recommended.

Measured parts read the probe's BN passes (``probe.json``: running statistics next to
population statistics of each BN's input, recomputed on the probe data in eval mode with
dropout off — and on with the same data, to separate dropout's effect from staleness).
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num, pct, stack
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import (
    input_moments_from_dropout_output,
    shift_factor,
    stale_stats,
    variance_shift_closed_form,
)
from normscope.analyze.modinfo import BATCHNORM, DROPOUT, is_bn, is_norm
from normscope.analyze.registry import SkipCheck, register

WU_HE_2018 = {"images_per_gpu": [32, 16, 8, 4, 2], "bn_top1_error": [23.6, 23.7, 24.8, 27.3, 34.7],
              "gn_top1_error": [24.1, 24.2, 24.0, 24.2, 24.1]}  # fmt: skip


def _dropout_p(ctx, node) -> float:
    """Drop probability of a dropout node (module or functional, training-time only), else 0."""
    if node.op == "module":
        info = ctx.modules.get(node.module or "", {})
        if (info.get("type") or node.type) in DROPOUT:
            p = info.get("p")
            return float(p) if p is not None else 0.5
        return 0.0
    if node.op == "function" and node.type in ("dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"):
        if node.attrs.get("training") is False:
            return 0.0
        p = node.attrs.get("p")
        return float(p) if p is not None else 0.5
    return 0.0


def bn_nodes(ctx, g):
    return [n for n in g.module_nodes() if is_bn(ctx.node_type(n))]


def dropouts_upstream(ctx, g, node, through_norms: bool = False) -> list[tuple[str, float, bool]]:
    """(name, p, direct) of dropouts upstream of ``node`` (stopping at normalisation layers)."""
    stop = (lambda n: False) if through_norms else (lambda n: n.op == "module" and is_norm(ctx.node_type(n)))
    direct_ids = {n.id for n in g.producers(node.id)}
    out = []
    for n in g.upstream(node.id, stop):
        if n.id == node.id:
            continue
        p = _dropout_p(ctx, n)
        if p > 0:
            out.append((n.module or n.id, p, n.id in direct_ids))
    return out


def _bn_train_batch(ctx, layer: str) -> float | None:
    tr = ctx.train
    d = tr[(tr.layer == layer) & (tr.output == "input")] if len(tr) else tr
    if not len(d):
        return None
    return float(np.median(d.samples.to_numpy(float) / np.maximum(d.forwards.to_numpy(float), 1)))


def _pass(b: dict, key: str):
    ps = (b.get("passes") or {}).get(key)
    if not ps:
        return None
    return np.asarray(ps["mean"], dtype=np.float64), np.asarray(ps["var"], dtype=np.float64)


# --- dropout-bn-variance-shift -----------------------------------------------------------------
VS_ID = "dropout-bn-variance-shift"


@register(
    id=VS_ID, severity="warning",
    summary="Dropout upstream of a BatchNorm (no normalisation in between): BN's running variance is learned with dropout on and is wrong at test time (Li et al. 2019).",
    needs=("graph",),
    params={"warn": 1.1},
)  # fmt: skip
def variance_shift(ctx, p):
    g = ctx.require_graph()
    bns = bn_nodes(ctx, g)
    if not bns:
        raise SkipCheck("no BatchNorm layer in the model")
    probe_bn = ctx.probe.get("bn") or {}
    out = []
    seen = set()
    for bn in bns:
        if bn.module in seen:
            continue
        drops = dropouts_upstream(ctx, g, bn)
        if not drops:
            continue
        seen.add(bn.module)
        name, p_drop, direct = max(drops, key=lambda d: (d[2], d[1]))
        retain = 1.0 - p_drop
        ev = {"dropouts": [{"module": n, "p": pd, "direct": dr} for n, pd, dr in drops], "bn": bn.module,
              "graph": g.source, "retain_probability": retain, "threshold": p["warn"]}  # fmt: skip
        measured = None
        b = probe_bn.get(bn.module)
        if b and b.get("running_var") is not None and _pass(b, "train/eval") is not None:
            rv = np.asarray(b["running_var"], dtype=np.float64)
            _, v_eval = _pass(b, "train/eval")
            ok = (rv > 1e-12) & (v_eval > 1e-12)
            if ok.any():
                r = float(np.median(v_eval[ok] / rv[ok]))
                measured = float(shift_factor(r))
                ev.update(measured_shift=measured, var_ratio_eval_over_running=r, channels=int(ok.sum()))
            drop = _pass(b, "train/drop")
            if drop is not None:
                okd = ok & (drop[1] > 1e-12)
                if okd.any():
                    ev["var_ratio_eval_over_train_dropout"] = float(np.median(v_eval[okd] / drop[1][okd]))
        predicted = None
        if direct:
            d = ctx.layer_series(name, 0)
            if len(d):
                w = max(1, len(d) // 10)
                c = np.nanmean(stack(d.ch_mean)[-w:], axis=0)
                vv = np.nanmean(stack(d.ch_var)[-w:], axis=0)
                c, v_in = input_moments_from_dropout_output(c, vv, retain)
                ok = (v_in > 1e-12) & np.isfinite(v_in)
                if ok.any():
                    delta = float(np.median(variance_shift_closed_form(retain, c[ok], v_in[ok])))
                    predicted = float(shift_factor(delta))
                    ev.update(predicted_delta=delta, predicted_shift=predicted)
        if measured is None and predicted is None:
            predicted = float(shift_factor(retain))  # Δ = q when the input has zero mean
            ev.update(predicted_delta=retain, predicted_shift=predicted, prediction="zero-mean input (Δ = q)")
        shift = measured if measured is not None else predicted
        sev = "warning" if shift > p["warn"] else "info"
        how = "measured" if measured is not None else "predicted"
        msg = (f"{name} (dropout p={num(p_drop)}) feeds {bn.module} with no normalisation in between, so BN's running "
               f"variance is learned with dropout on: at test time the variance it normalises is off by ×{num(shift)} "
               f"({how}).")  # fmt: skip
        rec = ("Move dropout after the last BatchNorm (e.g. only before the classifier), lower its rate, use a "
               "variance-stable dropout (Uout: x·(1+r), r ~ U(−β, β), Δ = 3/(3+β²)), or re-estimate the BN statistics "
               "with dropout off before evaluating (normscope.recalibrate_bn). Li et al. 2019: with retain "
               "probability q, Var_test/Var_train = v/((c²+v)/q − c²).")
        out.append(Finding(VS_ID, sev, bn.module, None, msg, ev, rec))
    return out


# --- small-batch-bn ----------------------------------------------------------------------------
SB_ID = "small-batch-bn"


@register(
    id=SB_ID, severity="error",
    summary="BatchNorm estimating statistics from too few samples per replica (warn < 16, error < 4; Wu & He 2018).",
    needs=("stats", "training"),
    params={"warn": 16, "error": 4},
)  # fmt: skip
def small_batch(ctx, p):
    tr = ctx.train
    bn_in = tr[(tr.output == "input") & tr.module_type.isin(BATCHNORM - {"SyncBatchNorm"})]
    if not len(bn_in):
        raise SkipCheck("no BatchNorm layer ran in training mode")
    probe_bn = ctx.probe.get("bn") or {}
    world = int((ctx.probe.get("distributed") or {}).get("world_size") or 1)
    out = []
    for layer, call in ctx.layer_calls(bn_in, output="input"):
        d = bn_in[(bn_in.layer == layer) & (bn_in.call == call)].sort_values("step")
        batch = float(np.median(d.samples.to_numpy(float) / np.maximum(d.forwards.to_numpy(float), 1)))
        if batch >= p["warn"]:
            continue
        sev = "error" if batch < p["error"] else "warning"
        w = max(2, len(d) // 4)
        m = stack(d.ch_mean)[-w:]
        v = stack(d.ch_var)[-w:]
        ev = {"batch_per_replica": batch, "world_size": world, "call": call, "wu_he_2018": WU_HE_2018,
              "thresholds": {"warn": p["warn"], "error": p["error"]}}  # fmt: skip
        if len(m) >= 2:
            sd = np.sqrt(np.nanmean(v, axis=0))
            ok = sd > 1e-12
            if ok.any():
                ev["batch_mean_noise_sigma"] = float(np.median(np.nanstd(m, axis=0)[ok] / sd[ok]))
                ev["batch_var_noise_rel"] = float(np.median((np.nanstd(v, axis=0) / np.nanmean(v, axis=0))[ok]))
        b = probe_bn.get(layer)
        if b and b.get("running_mean") is not None and len(m):
            rm, rv = np.asarray(b["running_mean"], float), np.asarray(b["running_var"], float)
            if rm.size == m.shape[1]:
                ok = rv > 1e-12
                with np.errstate(divide="ignore", invalid="ignore"):
                    ev["batch_mean_rms_vs_running_sigma"] = float(np.sqrt(np.nanmean((m[:, ok] - rm[ok]) ** 2 / rv[ok])))
                    lv = np.log(v[:, ok] / rv[ok])
                    ev["batch_var_rms_log_ratio_vs_running"] = float(np.sqrt(np.nanmean(lv[np.isfinite(lv)] ** 2)))
        if b and b.get("running_mean") is not None:
            key = "eval/eval" if _pass(b, "eval/eval") is not None else "train/eval"
            pop = _pass(b, key)
            if pop is not None:
                dmu, ratio = stale_stats(b["running_mean"], b["running_var"], pop[0], pop[1], b.get("eps", 1e-5))
                ev.update(running_mean_error_sigma=float(np.median(dmu)), running_var_ratio=float(np.median(ratio)),
                          population_data=key.split("/")[0])  # fmt: skip
        msg = (f"{layer} normalises with statistics of {num(batch)} sample(s) per replica (below {p['warn']}): batch "
               f"statistics are noisy and train/test behaviour diverges (Wu & He 2018: ResNet-50 top-1 error 23.6 % at "
               f"32 images per GPU, 34.7 % at 2).")  # fmt: skip
        rec = ("Use GroupNorm (batch-independent: 24.1 % at 2 images per GPU in the same study), SyncBatchNorm under "
               "DDP to pool statistics across replicas, batch renormalisation, or a larger per-replica batch (gradient "
               "accumulation does not help: BN statistics stay per micro-batch).")
        out.append(Finding(SB_ID, sev, layer, None, msg, ev, rec))
    return out


# --- stale-running-stats -----------------------------------------------------------------------
ST_ID = "stale-running-stats"


@register(
    id=ST_ID, severity="warning",
    summary="BatchNorm running mean/var that no longer match the population statistics of the data (and a train/eval output gap).",
    needs=("training",),
    params={"mean_sigma": 0.1, "var_lo": 0.8, "var_hi": 1.25, "channel_frac": 0.5, "output_gap": 0.25,
            "small_batch": 16},
)  # fmt: skip
def stale(ctx, p):
    bn = ctx.require_probe("bn", "BatchNorm population statistics")
    g = ctx.graph
    out = []
    flagged = []
    skipped_small = []
    judged = 0
    for name, b in bn.items():
        if not b.get("track_running_stats", True) or b.get("running_mean") is None:
            continue
        batch = b.get("batch") or _bn_train_batch(ctx, name)
        if batch is not None and batch < p["small_batch"]:
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
        bad = ((dmu > p["mean_sigma"]) | (ratio < p["var_lo"]) | (ratio > p["var_hi"])) & live
        frac = float(bad[live].mean())
        if frac < p["channel_frac"]:
            continue
        flagged.append(name)
        ev = {"population": key, "channels": int(live.sum()), "stale_channels": int(bad.sum()), "stale_fraction": frac,
              "mean_shift_sigma_median": float(np.median(dmu[live])), "mean_shift_sigma_max": float(np.max(dmu[live])),
              "var_ratio_median": float(np.median(ratio[live])), "var_ratio_min": float(np.min(ratio[live])),
              "var_ratio_max": float(np.max(ratio[live])), "dropout_upstream": drop_up,
              "thresholds": {k: p[k] for k in ("mean_sigma", "var_lo", "var_hi", "channel_frac")}}  # fmt: skip
        gap = ctx.probe.get("bn_gap") or {}
        if gap.get("rel_gap") is not None:
            ev["train_eval_output_gap"] = gap["rel_gap"]
        src = "the eval data" if data == "eval" else "the training data"
        msg = (f"{name}'s running statistics do not match {src} (recomputed with {'dropout on, as in training' if key.endswith('drop') else 'dropout off'}): "
               f"{pct(frac)} of channels are off (median mean shift {num(ev['mean_shift_sigma_median'])} σ, median "
               f"running/population variance ratio {num(ev['var_ratio_median'])}).")  # fmt: skip
        rec = ("Recalibrate the BN statistics on data from the distribution you evaluate on (normscope.recalibrate_bn: "
               "a PreciseBN-style pass with equal weight per sample and dropout off), or check why the data changed "
               "between training and evaluation; a very small or very large BN momentum also leaves stale statistics.")
        out.append(Finding(ST_ID, "warning", name, None, msg, ev, rec))
    gap = ctx.probe.get("bn_gap") or {}
    if not flagged and judged and gap.get("rel_gap") is not None and gap["rel_gap"] > p["output_gap"]:
        msg = (f"The model's outputs differ by {pct(gap['rel_gap'])} (relative L2) between train-mode BatchNorm (batch "
               f"statistics) and eval mode (running statistics) on {gap.get('samples')} samples of the {gap.get('data')} data.")
        rec = "Recalibrate BN statistics (normscope.recalibrate_bn) on data like the evaluation data."
        out.append(Finding(ST_ID, "warning", None, None, msg, dict(gap, threshold=p["output_gap"]), rec))
    if not judged and not out:
        if skipped_small:
            raise SkipCheck(f"every BatchNorm sees fewer than {p['small_batch']} samples per batch: small-batch-bn reports them")
        raise SkipCheck("no BatchNorm layer tracks running statistics")
    return out


# --- syncbn-recommended ------------------------------------------------------------------------
SY_ID = "syncbn-recommended"


@register(
    id=SY_ID, severity="warning",
    summary="Under torch.distributed, a BatchNorm (not SyncBatchNorm) whose per-rank batch is small: convert to SyncBatchNorm.",
    needs=("stats", "training"),
    params={"batch": 16},
)  # fmt: skip
def syncbn(ctx, p):
    dist = ctx.probe.get("distributed") or ctx.run.meta.get("distributed") or {}
    world = int(dist.get("world_size") or 1)
    if world <= 1:
        raise SkipCheck("the run was not recorded under torch.distributed with more than one process")
    tr = ctx.train
    bn_in = tr[(tr.output == "input") & tr.module_type.isin(BATCHNORM - {"SyncBatchNorm"})]
    out = []
    for layer, call in ctx.layer_calls(bn_in, output="input"):
        batch = _bn_train_batch(ctx, layer)
        if batch is None or batch >= p["batch"]:
            continue
        msg = (f"{layer} computes statistics from {num(batch)} samples on each of {world} ranks; SyncBatchNorm would "
               f"use {num(batch * world)}.")
        rec = ("model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping it in "
               "DistributedDataParallel (costs one all-reduce per BN layer per forward).")
        out.append(Finding(SY_ID, "warning", layer, None, msg,
                           {"batch_per_rank": batch, "world_size": world, "threshold": p["batch"]}, rec))
    return out
