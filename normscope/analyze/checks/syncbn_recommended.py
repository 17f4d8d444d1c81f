"""syncbn-recommended: Under torch.distributed, a BatchNorm (not SyncBatchNorm) whose per-rank batch is small: convert to SyncBatchNorm.

What it measures, why it matters and how to fix it: docs/checks/syncbn-recommended.md.
"""

from __future__ import annotations

from normscope.analyze.checks._bn import _bn_train_batch
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM

ID = "syncbn-recommended"


@register(
    id=ID, severity="warning",
    summary="Under torch.distributed, a BatchNorm (not SyncBatchNorm) whose per-rank batch is small: convert to SyncBatchNorm.",
    needs=("stats", "training"),
    thresholds={"batch": 16},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    dist = ctx.probe.get("distributed") or ctx.run.meta.get("distributed") or {}
    world = int(dist.get("world_size") or 1)
    if world <= 1:
        raise SkipCheck("the run was not recorded under torch.distributed with more than one process")
    tr = ctx.train
    bn_in = tr[(tr.output == "input") & tr.module_type.isin(BATCHNORM - {"SyncBatchNorm"})]
    out = []
    for layer, _call in ctx.layer_calls(bn_in, output="input"):
        batch = _bn_train_batch(ctx, layer)
        if batch is None or batch >= t["batch"]:
            continue
        msg = (
            f"{layer} computes statistics from {num(batch)} samples on each of {world} ranks; SyncBatchNorm would "
            f"use {num(batch * world)}."
        )
        rec = (
            "model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping it in "
            "DistributedDataParallel (costs one all-reduce per BN layer per forward)."
        )
        out.append(
            Finding(
                ID,
                "warning",
                layer,
                None,
                msg,
                {"batch_per_rank": batch, "world_size": world, "threshold": t["batch"]},
                rec,
            )
        )
    return out
