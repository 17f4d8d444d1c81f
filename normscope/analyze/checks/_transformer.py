"""Helpers of the transformer checks (attention-logit-growth, output-logit-divergence,
massive-activations): the probes' signals as per-layer step series, and the norm that reads a
block's output."""

from __future__ import annotations

import numpy as np
import pandas as pd

from normscope.analyze.context import Context
from normscope.roles import is_norm_info


def signal_phase(ctx: Context, name: str) -> str | None:
    """ "train" when the signal has train rows, else "eval" (an inference-only run), else None."""
    s = ctx.signal(name, None)
    if not len(s):
        return None
    return "train" if (s.phase == "train").any() else "eval"


def unrecorded(ctx: Context, reason: str) -> str:
    """A skip reason for a signal that is absent: under torch.compile the transformer probes do not
    run, which the run's meta records (``compiled``); else ``reason``."""
    if ctx.meta.get("compiled"):
        return ("the model ran under torch.compile, where the transformer probes (attention logits, output "
                "log Z, block outputs) do not run: record a few eager steps to judge it")  # fmt: skip
    return reason


def wide(ctx: Context, names: tuple[str, ...] | list[str], phase: str, agg: str = "max") -> pd.DataFrame:
    """Rows (layer, step) × one column per signal name; several calls of a layer in a step (the
    module used twice, or several forwards per step) combine by ``agg``."""
    s = ctx.signals
    s = s[(s.phase == phase) & s.name.isin(list(names))]
    if ctx.nonfinite_step is not None:  # from the first NaN/Inf on, the run is non-finite's to report
        s = s[s.step < ctx.nonfinite_step]
    if not len(s):
        return pd.DataFrame(columns=["layer", "step", *names])
    w = s.pivot_table(index=["layer", "step"], columns="name", values="value", aggfunc=agg).reset_index()
    w.columns.name = None
    return w.sort_values(["layer", "step"]).reset_index(drop=True)


def end_window(ctx: Context, values: np.ndarray, frac: float, min_rows: int) -> tuple[float, int]:
    """Mean of the final window of a series and the index of the window's first row."""
    n = len(values)
    w = ctx.window_rows(n, frac, min_rows)
    tail = values[n - w :]
    return (float(np.nanmean(tail)) if np.isfinite(tail).any() else float("nan")), n - w


def thin(steps: np.ndarray, values: np.ndarray, n: int = 50) -> dict:
    k = max(1, len(steps) // n)
    return {"step": [int(s) for s in steps[::k]], "value": [float(v) for v in values[::k]]}


def next_norm(ctx: Context, block: str) -> str | None:
    """The first normalisation module to run after ``block`` (execution order) outside it: the next
    block's pre-LN (input_layernorm, ln_1) or the final norm (model.norm, ln_f)."""
    order = ctx.meta.get("execution_order") or []
    inside = [i for i, r in enumerate(order) if r["layer"] == block or r["layer"].startswith(block + ".")]
    if not inside:
        return None
    mods = ctx.modules
    for r in order[max(inside) + 1 :]:
        name = r["layer"]
        if name.startswith(block + "."):
            continue
        info = mods.get(name) or {"type": r.get("type")}
        if is_norm_info(info) or is_norm_info({"type": r.get("type")}):
            return name
    return None
