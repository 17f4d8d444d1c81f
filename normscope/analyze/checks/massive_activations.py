"""massive-activations: a few residual-stream values orders of magnitude above the rest.

Sun et al. 2024: in trained transformers a handful of hidden-state values are 10³–10⁴× the median
magnitude, in fixed channels and often at the first or delimiter tokens; the next LayerNorm/RMSNorm
turns them into near-constant vectors that act as attention sinks, and they break low-bit
quantisation (Dettmers et al. 2022). The collector records, per transformer block output, max |x|,
the exact median |x| over a subsample, and the top channels with their positions
(normscope.collect.attention). Info from ``info``× the median, warning from ``warn``×."""

from __future__ import annotations

import numpy as np

from normscope.analyze.checks._transformer import end_window, next_norm, signal_phase, thin, unrecorded, wide
from normscope.analyze.checks._util import num
from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "massive-activations"

REC = (
    "Usually benign in a trained LLM, but they decide quantisation and attention: keep the channels "
    "{ch} in higher precision (LLM.int8() outlier decomposition, Dettmers et al. 2022) or smooth them "
    "(SmoothQuant); to remove them, give attention an explicit bias (learnable key/value bias or "
    "'attention sink' tokens, Sun et al. 2024), or add QK-norm / clip the residual; check the learning rate "
    "and weight decay of the layers that write these channels."
)


def ratio_of(absmax, median) -> np.ndarray:
    """max |x| / median |x| (inf when the median is 0 and the max is not)."""
    a, m = np.asarray(absmax, dtype=np.float64), np.asarray(median, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m > 0, a / np.where(m > 0, m, 1.0), np.where(a > 0, np.inf, 1.0))


def block_rows(ctx: Context, phase: str):
    s = ctx.signals
    names = sorted({n for n in s.name.unique() if str(n).startswith("massive_")})
    return wide(ctx, names, phase, agg="first"), names


@register(
    id=ID, severity="warning",
    summary="Massive residual-stream activations: max |x| / median |x| of a transformer block output beyond 10³ (attention sinks, quantisation outliers).",
    needs=(),
    thresholds={"info": 100.0, "warn": 1000.0, "window_frac": 0.1, "min_window_steps": 3},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    phase = signal_phase(ctx, "massive_absmax")
    if phase is None:
        raise SkipCheck(
            unrecorded(
                ctx,
                "no transformer block output was recorded (no ModuleList of identical blocks holding attention; "
                "docs/roles.md), or the run predates the probe",
            )
        )
    w, names = block_rows(ctx, phase)
    k = sum(1 for n in names if n.startswith("massive_ch_"))
    blocks = []
    for layer, d in w.groupby("layer", sort=False):
        steps = d.step.to_numpy()
        r = ratio_of(d.massive_absmax, d.massive_median)
        end, w0 = end_window(ctx, np.where(np.isfinite(r), r, np.nan), t["window_frac"], t["min_window_steps"])
        if not np.isfinite(end):
            end = float(np.nanmax(r)) if np.isfinite(r).any() or np.isinf(r).any() else np.nan
        last = d.iloc[-1]
        med = float(last.massive_median)
        chans = [
            {"channel": int(last[f"massive_ch_{i}"]), "value": float(last[f"massive_val_{i}"]),
             "position": int(last[f"massive_pos_{i}"]),
             "ratio": float(last[f"massive_val_{i}"]) / med if med > 0 else float("inf")}
            for i in range(k) if f"massive_ch_{i}" in last and np.isfinite(last[f"massive_ch_{i}"])
        ]  # fmt: skip
        blocks.append({
            "layer": layer, "ratio_end": end, "ratio_first": float(r[0]), "ratio_peak": float(np.nanmax(r)),
            "absmax_end": float(last.massive_absmax), "median_end": med, "step": int(steps[-1]),
            "window_steps": [int(steps[w0]), int(steps[-1])],
            "channels": [c for c in chans if c["ratio"] >= t["info"]] or chans[:1],
            "next_norm": next_norm(ctx, layer), "series": thin(steps, r),
        })  # fmt: skip
    blocks.sort(key=lambda b: ctx.order(b["layer"]))
    out = []

    # warning when they appear during this run; present from the first sampled step (a pretrained
    # LLM: Sun et al. find them in every one) they are info — worth knowing for quantisation
    def band(b):
        r = b["ratio_end"]
        if not r >= t["info"]:
            return None
        if r >= t["warn"] and not b["ratio_first"] >= t["warn"]:
            return "warning"
        return "info"

    for sev in ("warning", "info"):
        hit = [b for b in blocks if band(b) == sev]
        if not hit:
            continue
        top = max(hit, key=lambda b: b["ratio_end"])
        chans = sorted({c["channel"] for b in hit for c in b["channels"]})
        pos = sorted({c["position"] for b in hit for c in b["channels"]})
        where = ", ".join(f"{b['layer']} ({num(b['ratio_end'])}×)" for b in hit[:6]) + (" …" if len(hit) > 6 else "")
        norm = f"; the next norm layer, {top['next_norm']}, sees them" if top["next_norm"] else ""
        msg = (
            f"{len(hit)} transformer block output(s) hold values {num(top['ratio_end'])}× their median magnitude "
            f"(max |x| {num(top['absmax_end'])} vs median {num(top['median_end'])} in {top['layer']}), in channel(s) "
            f"{', '.join(map(str, chans[:8]))} at position(s) {', '.join(map(str, pos[:8]))}{norm}: {where}."
        )
        ev = {
            "ratio_max": top["ratio_end"], "score": top["ratio_end"], "layer_max": top["layer"], "channels": chans,
            "positions": pos, "blocks": hit, "next_norm": top["next_norm"], "phase": phase,
            "thresholds": {"info": t["info"], "warn": t["warn"]},
        }  # fmt: skip
        out.append(Finding(ID, sev, hit[0]["layer"], tuple(top["window_steps"]), msg, ev,
                           REC.format(ch=", ".join(map(str, chans[:8])))))  # fmt: skip
    return out
