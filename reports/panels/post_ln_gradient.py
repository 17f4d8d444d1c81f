"""post-ln-gradient: each post-LN block's weight-gradient norm at the first steps, and the last/first
ratio per step (the check's statistic and threshold)."""

from __future__ import annotations

import numpy as np

from normscope_reports.panels import threshold

ID = "post-ln-gradient"
STEPS_SHOWN = 10


def panels(run, findings: list[dict], F) -> list[dict]:
    from normscope.analyze.checks.post_ln_gradient import block_grad_norms, post_ln_stacks
    from normscope.analyze.config import Config
    from normscope.analyze.context import Context

    ctx = Context(run)
    if not len(ctx.params):
        return []
    stacks = post_ln_stacks(ctx)
    if not stacks:
        return []
    t = {k: threshold(findings, ID, k) for k in Config().thresholds(ID)}
    first = max(1, int(t["first_steps"]))
    steps = sorted(int(s) for s in ctx.params.step.unique())[:STEPS_SHOWN]
    out = []
    for stack, blocks in stacks.items():
        g, used = block_grad_norms(ctx, blocks, steps)
        keep = [i for i, b in enumerate(blocks) if used[b] and np.isfinite(g[i]).any()]
        if len(keep) < 2:
            continue
        labels = [blocks[i] for i in keep]
        med = np.nanmedian(g[keep][:, :first], axis=1)
        uri, hover = F.layer_bars(
            f"Post-LN blocks of {stack or '<root>'}: weight-gradient norm at the first {min(first, len(steps))} step(s)",
            "‖∇W_block‖ (median over the first steps)", labels, med,
        )  # fmt: skip
        with np.errstate(divide="ignore", invalid="ignore"):
            r = g[keep[-1]] / g[keep[0]]
        ok = np.isfinite(r[:first])
        ratio = float(np.median(r[:first][ok])) if ok.any() else float("nan")  # the check's statistic
        out.append({"check": ID, "title": f"{stack}: block weight-gradient norm", "src": uri, "hover": hover,
                    "note": f"last/first = {ratio:.3g} (median of the per-step ratios over the first {first} "
                            f"step(s)); post-ln-gradient flags a ratio above {t['ratio']:g}"})  # fmt: skip
        uri, hover = F.step_series(
            f"{stack}: last/first post-LN block weight-gradient norm over the first steps", "last / first",
            {f"{labels[-1]} / {labels[0]}": (np.asarray(steps), r)}, threshold=float(t["ratio"]),
        )  # fmt: skip
        out.append({"check": ID, "title": f"{stack}: gradient ratio over steps", "src": uri, "hover": hover,
                    "note": "post-LN: the ratio can grow over the first updates at full learning rate "
                            "(Liu et al. 2020); warmup keeps it down"})  # fmt: skip
    return out
