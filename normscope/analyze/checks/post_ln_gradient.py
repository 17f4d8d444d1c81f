"""post-ln-gradient: post-LayerNorm blocks whose last block's weight gradient dwarfs the first block's at the start.

What it measures, why it matters and how to fix it: docs/checks/post-ln-gradient.md.
"""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM, EMBEDDING, INSTANCENORM, LRN, block_stacks, is_norm_info

ID = "post-ln-gradient"
CHANNEL_NORMS = BATCHNORM | INSTANCENORM | LRN  # post-LN is about layer-wise norms (LayerNorm, RMSNorm)


def block_weights(ctx: Context, block: str) -> list[str]:
    """The matrix weights of one block: parameters named ``*weight`` (``in_proj_weight`` too) of its
    non-norm, non-embedding modules (biases and norm gains are not what Xiong et al. bound)."""
    names = []
    for name in ctx.params.param.unique():
        name = str(name)
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        if not layer.startswith(block + ".") and layer != block:
            continue
        info = ctx.modules.get(layer, {})
        # a weight-normalised layer's direction v stands for its weight, as in vanishing-gradients
        wn_v = {f"{layer}.{w['v']}" if layer else w["v"] for w in info.get("weight_norm") or ()}
        if (not name.endswith("weight") and name not in wn_v) or is_norm_info(info) or info.get("type") in EMBEDDING:
            continue
        names.append(name)
    return names


def block_grad_norms(ctx: Context, blocks: list[str], steps: list[int]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """‖∇W_b‖ = sqrt(Σ_W∈b ‖∇W‖²) per block (rows) and step (columns)."""
    p = ctx.params
    p = p[p.step.isin(steps)]
    out = np.full((len(blocks), len(steps)), np.nan)
    used = {}
    for i, b in enumerate(blocks):
        ws = block_weights(ctx, b)
        used[b] = ws
        d = p[p.param.isin(ws)]
        for j, s in enumerate(steps):
            g = d[d.step == s].grad_norm.to_numpy(float)
            if len(g) and np.isfinite(g).all():
                out[i, j] = float(np.sqrt(np.sum(g * g)))
    return out, used


def warmup(ctx: Context, params: list[str], t: Thresholds) -> dict | None:
    """The recorded learning rate of ``params`` rising over the first steps: the first step's lr below
    ``warmup_start`` × the peak, reached later. Returns {start_lr, peak_lr, peak_step} or None."""
    p = ctx.params
    d = p[p.param.isin(params)].groupby("step").lr.max().sort_index()
    d = d[np.isfinite(d.to_numpy(float))]
    if len(d) < 2:
        return None
    lr = d.to_numpy(float)
    peak = float(lr.max())
    if peak <= 0 or not lr[0] < t["warmup_start"] * peak:
        return None
    return {"start_lr": float(lr[0]), "peak_lr": peak, "peak_step": int(d.index[int(np.argmax(lr >= 0.99 * peak))])}


def post_ln_stacks(ctx: Context) -> dict[str, list[str]]:
    """{stack: [block, ...]}: stacks of two or more post-LayerNorm blocks (channel norms left out)."""
    placement = ctx.norm_placement
    stacks = {}
    for stack, blocks in block_stacks(placement, "post").items():
        blocks = [b for b in blocks if ctx.type_of(placement[b]["last"]) not in CHANNEL_NORMS]
        if len(blocks) >= 2:
            stacks[stack] = blocks
    return stacks


@register(
    id=ID, severity="warning",
    summary="Post-LN transformer: the last block's weight-gradient norm > 10 × the first block's at the start (needs warmup, or pre-LN).",
    needs=("params", "training"),
    thresholds={"ratio": 10.0, "first_steps": 3, "warmup_start": 0.5},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    placement = ctx.norm_placement
    if not placement:
        raise SkipCheck("no repeated block (numbered container of two or more modules) in the execution order")
    stacks = post_ln_stacks(ctx)
    if not stacks:
        kinds = sorted({str(v["placement"]) for v in placement.values()})
        raise SkipCheck(f"no stack of two or more post-LayerNorm blocks (block norm placements: {', '.join(kinds)})")
    steps = sorted(int(s) for s in ctx.params.step.unique())[: max(1, int(t["first_steps"]))]
    out = []
    judged = 0
    for stack, blocks in stacks.items():
        g, used = block_grad_norms(ctx, blocks, steps)
        keep = [i for i, b in enumerate(blocks) if used[b] and np.isfinite(g[i]).any()]
        if len(keep) < 2:
            continue
        first, last = blocks[keep[0]], blocks[keep[-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            per_step = g[keep[-1]] / g[keep[0]]
        ok = np.isfinite(per_step)
        if not ok.any():
            continue
        ratio = float(np.median(per_step[ok]))
        judged += 1
        if ratio <= t["ratio"]:
            continue
        all_w = [w for b in blocks for w in used[b]]
        wu = warmup(ctx, all_w, t)
        sev = "info" if wu else "warning"
        n = len(blocks)
        msg = (
            f"{n} post-LayerNorm blocks ({stack or '<root>'}.*: the norm follows the residual sum): at the first "
            f"{len(steps)} step(s) the weight-gradient norm of the last block ({last}) is {num(ratio)} × the first "
            f"block's ({first}), above {num(t['ratio'])} (median of the per-step ratios "
            f"{', '.join(num(x) for x in per_step[ok])}; Xiong et al. 2020, Liu et al. 2020: gradients near the "
            "output dwarf those near the input over the first updates, which makes a post-LN transformer diverge "
            "at full learning rate)"
        )
        if wu:
            msg += (
                f"; the learning rate warms up ({num(wu['start_lr'])} at the first step to {num(wu['peak_lr'])} at "
                f"step {wu['peak_step']}), which is what handles this risk."
            )
        else:
            msg += "; the recorded learning rate does not warm up."
        rec = (
            "Warm the learning rate up: linearly from ~0 over the first few % of the steps (Vaswani et al. 2017 used "
            "4000 steps; e.g. torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=W)), or move "
            "the norm to the branch input — pre-LN (nn.TransformerEncoderLayer(norm_first=True); GPT-2, Llama) keeps "
            "the gradient even across depth and trains without warmup (Xiong et al. 2020)."
        )
        ev = {
            "stack": stack, "blocks": [
                {"block": b, "grad_norm": [float(x) for x in g[i]], "weights": len(used[b]),
                 "first_norm": placement[b]["norms"][0] if placement[b]["norms"] else None,
                 "last": placement[b]["last"], "placement_by": placement[b].get("by")}
                for i, b in enumerate(blocks)],
            "steps": steps, "first_block": first, "last_block": last, "ratio_last_over_first": ratio,
            "ratio_per_step": [float(x) for x in per_step], "warmup": wu, "thresholds": dict(t),
            "measure": "‖∇W_block‖ = sqrt(Σ ‖∇W‖²) over the block's matrix weights",
        }  # fmt: skip
        out.append(Finding(ID, sev, last, (steps[0], steps[-1]), msg, ev, rec))
    if not judged:
        raise SkipCheck("no post-LN stack has weight gradients in two of its blocks at the first steps")
    return out
