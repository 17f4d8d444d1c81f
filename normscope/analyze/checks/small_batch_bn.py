"""small-batch-bn: BatchNorm estimating statistics from too few samples per replica (warn < 16, error < 4; Wu & He 2018).

What it measures, why it matters and how to fix it: docs/checks/small-batch-bn.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._bn import WU_HE_2018, _pass
from normscope.analyze.checks._util import num, stack
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.formulas import (
    stale_stats,
)
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM

ID = "small-batch-bn"


@register(
    id=ID, severity="error",
    summary="BatchNorm estimating statistics from too few samples per replica (warn < 16, error < 4; Wu & He 2018).",
    needs=("stats", "training"),
    thresholds={"warn": 16, "error": 4},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
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
        if batch >= t["warn"]:
            continue
        sev = "error" if batch < t["error"] else "warning"
        w = max(2, len(d) // 4)
        m = stack(d.ch_mean)[-w:]
        v = stack(d.ch_var)[-w:]
        ev = {"batch_per_replica": batch, "score": -batch, "world_size": world, "call": call, "wu_he_2018": WU_HE_2018,
              "thresholds": {"warn": t["warn"], "error": t["error"]}}  # fmt: skip
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
                    ev["batch_mean_rms_vs_running_sigma"] = float(
                        np.sqrt(np.nanmean((m[:, ok] - rm[ok]) ** 2 / rv[ok]))
                    )
                    lv = np.log(v[:, ok] / rv[ok])
                    ev["batch_var_rms_log_ratio_vs_running"] = float(np.sqrt(np.nanmean(lv[np.isfinite(lv)] ** 2)))
        if b and b.get("running_mean") is not None:
            key = "eval/eval" if _pass(b, "eval/eval") is not None else "train/eval"
            pop = _pass(b, key)
            if pop is not None:
                dmu, ratio = stale_stats(b["running_mean"], b["running_var"], pop[0], pop[1], b.get("eps", 1e-5))
                ev.update(running_mean_error_sigma=float(np.median(dmu)), running_var_ratio=float(np.median(ratio)),
                          population_data=key.split("/")[0])  # fmt: skip
        msg = (f"{layer} normalises with statistics of {num(batch)} sample(s) per replica (below {t['warn']}): batch "
               f"statistics are noisy and train/test behaviour diverges (Wu & He 2018: ResNet-50 top-1 error 23.6 % at "
               f"32 images per GPU, 34.7 % at 2).")  # fmt: skip
        rec = (
            "Use GroupNorm (batch-independent: 24.1 % at 2 images per GPU in the same study), SyncBatchNorm under "
            "DDP to pool statistics across replicas, batch renormalisation, or a larger per-replica batch (gradient "
            "accumulation does not help: BN statistics stay per micro-batch)."
        )
        out.append(Finding(ID, sev, layer, None, msg, ev, rec))
    return out
