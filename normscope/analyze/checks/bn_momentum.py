"""bn-momentum: A BatchNorm momentum ≥ 0.5 makes the running statistics the last batch's (TensorFlow's decay convention, inverted in PyTorch).

What it measures, why it matters and how to fix it: docs/checks/bn-momentum.md.
"""

from __future__ import annotations

from normscope.analyze.checks._bn import frozen_kept_in_eval
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register
from normscope.roles import BATCHNORM

ID = "bn-momentum"
MAX_MOMENTUM = 0.5  # the newest batch outweighs all the history before it


def is_bn(info: dict) -> bool:
    return bool(info.get("bn")) or info.get("type") in BATCHNORM


def inverted(momentum, limit: float) -> bool:
    """PyTorch's running ← (1 − m)·running + m·batch with m ≥ ``limit``: the newest batch outweighs the history."""
    return momentum is not None and float(momentum) >= limit


@register(
    id=ID, severity="warning",
    summary="A BatchNorm momentum ≥ 0.5 makes the running statistics the last batch's (TensorFlow's decay convention, inverted in PyTorch).",
    needs=(),
    thresholds={"max_momentum": MAX_MOMENTUM},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    bns = {n: info for n, info in ctx.modules.items() if is_bn(info) and info.get("track_running_stats", True)}
    if not bns:
        raise SkipCheck("no BatchNorm layer that tracks running statistics")
    if all("momentum" not in info for info in bns.values()):
        raise SkipCheck(
            "BatchNorm momentum not recorded: pass model= to analyze(), or record the run with this version"
        )
    # the momentum only matters where the running statistics were updated: a BN that ran in training
    # (its train rows; an unhooked one in a run that trained), not one kept in eval on purpose
    tr = ctx.train
    ran = set(tr.layer.unique()) if len(tr) else set()
    trained = len(ran) > 0
    hooked = {n: m.get("hooked", True) for n, m in ctx.run.modules.items()}
    kept = frozen_kept_in_eval(ctx)
    bns = {n: info for n, info in bns.items() if n not in kept and (n in ran or (trained and not hooked.get(n, True)))}
    if not bns:
        raise SkipCheck("no BatchNorm updated its running statistics in this run (inference only, or kept in eval)")
    by_value: dict[float, list[str]] = {}
    for name in sorted(bns, key=ctx.order):
        m = bns[name].get("momentum")
        if inverted(m, t["max_momentum"]):
            by_value.setdefault(float(m), []).append(name)
    out = []
    for m, layers in sorted(by_value.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(layers) - 1} more BatchNorm layer(s)" if len(layers) > 1 else ""
        kept = 1.0 - m
        msg = (
            f"{layers[0]}{more} use momentum {m:g}: PyTorch updates running = (1 − momentum)·running + "
            f"momentum·batch, so the last batch alone makes {num(100 * m)} % of the running statistics (an average "
            f"over ≈ {num(effective_batches(m))} batches; the default 0.1 averages ≈ 19): evaluation normalises "
            f"with one batch's noise instead of the population's statistics. {m:g} reads as TensorFlow/Keras's "
            f"decay (running = {m:g}·running + {num(kept)}·batch), which is momentum={num(kept)} in PyTorch."
        )
        rec = (
            f"Pass momentum={num(kept) if kept > 0 else '0.1'} (1 − the TensorFlow decay; torchvision fixed MaxViT's "
            "0.99 to 0.01 so), or momentum=None for a cumulative average; for a model already trained, recompute "
            "the running statistics on training data (normscope.recalibrate_bn) before evaluating or folding it."
        )
        ev = {"momentum": m, "pytorch_equivalent_of_tf_decay": kept, "last_batch_weight": m,
              "effective_batches": effective_batches(m),
              "layers": [{"layer": n, "severity": "warning", "momentum": m} for n in layers], "bn_layers": len(bns),
              "thresholds": dict(t)}  # fmt: skip
        out.append(Finding(ID, "warning", layers[0], None, msg, ev, rec))
    return out


def effective_batches(m: float) -> float:
    """The number of equally weighted batches with the variance of PyTorch's running average:
    (2 − m)/m for weights m(1 − m)^k (19 at the default 0.1, 1 at m = 1)."""
    return (2.0 - m) / m
