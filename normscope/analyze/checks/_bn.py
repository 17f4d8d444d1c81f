"""Helpers shared by the BatchNorm checks: BN nodes, dropouts upstream, the probe BN passes."""

from __future__ import annotations

import numpy as np

from normscope.roles import DROPOUT, is_bn, is_norm

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


def frozen_kept_in_eval(ctx) -> set[str]:
    """BatchNorm layers frozen on purpose: affine parameters that do not train (the mode audit's
    ``frozen_bn``) and never in train mode during a sampled training forward."""
    frozen = (ctx.meta.get("modes") or {}).get("frozen_bn") or {}
    if not frozen:
        return set()
    s = ctx.signals
    s = s[(s.phase == "train") & (s.name == "bn_train_forwards")]
    in_train = set(s[s.value > 0].layer)
    recorded = set(s.layer)
    return {n for n in frozen if n in recorded and n not in in_train}
