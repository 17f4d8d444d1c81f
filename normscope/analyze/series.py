"""Per-layer series for reports: covariate-shift drift and signal propagation.

Both follow from the collector's per-channel moments (``ch_mean``, ``ch_var``); the probe
adds residual-block measurements (``probe.json``'s ``signal``) when it could find blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from normscope.analyze.formulas import channel_drift

if TYPE_CHECKING:
    import pandas as pd

SIGNAL_COLUMNS = ["source", "when", "step", "order", "layer", "call", "kind", "avg_sq_mean", "avg_var", "branch_var"]
DRIFT_COLUMNS = ["step", "prev_step", "layer", "call", "output", "sym_kl", "w2", "channels"]


def _ctx(run):
    from normscope.analyze.context import Context
    from normscope.analyze.engine import as_run

    if isinstance(run, Context):
        return run
    return Context(as_run(run))


def covariate_shift(run, lag: int = 10) -> "pd.DataFrame":
    """Moment-based drift per layer output (and normalisation input) between sampled steps t and
    t − k (k ≥ ``lag`` training steps, the nearest earlier sampled step): mean over channels of
    the symmetric Gaussian KL and of the Gaussian W₂² normalised by σ²."""
    import pandas as pd

    ctx = _ctx(run)
    tr = ctx.train
    rows = []
    if len(tr):
        for (layer, call, output), d in tr.groupby(["layer", "call", "output"], sort=False):
            d = d.sort_values("step")
            steps = d.step.to_numpy()
            means = [np.asarray(v, dtype=np.float64) for v in d.ch_mean]
            vars_ = [np.asarray(v, dtype=np.float64) for v in d.ch_var]
            for i in range(1, len(d)):
                j = int(np.searchsorted(steps, steps[i] - lag, side="right")) - 1
                j = min(j, i - 1)
                if j < 0 or means[i].size != means[j].size:
                    continue
                kl, w2, n = channel_drift(means[j], vars_[j], means[i], vars_[i])
                rows.append((int(steps[i]), int(steps[j]), str(layer), int(call), str(output), kl, w2, n))
    df = pd.DataFrame(rows, columns=DRIFT_COLUMNS)
    if len(df):
        df["_o"] = [ctx.call_order.get((r.layer, r.call), 10**9) for r in df.itertuples()]
        df = df.sort_values(["_o", "output", "step"]).drop(columns="_o").reset_index(drop=True)
    return df


def signal_propagation(run, level: str = "auto") -> "pd.DataFrame":
    """Average channel squared mean mean_c[(mean x)²] and average channel variance mean_c[var x].

    ``level="block"``: residual-block outputs measured by the probe at initialisation and at
    the end (plus the residual branch's variance); ``"layer"``: every hooked layer output at
    every sampled train step, from the collector's ch_mean/ch_var; ``"auto"``: blocks when the
    probe found some, else layers.
    """
    import pandas as pd

    from normscope.errors import NormscopeError

    if level not in ("auto", "block", "layer"):
        raise NormscopeError(f"level must be 'auto', 'block' or 'layer', got {level!r}.")
    ctx = _ctx(run)
    sig = ctx.probe.get("signal") or []
    blocks = [r for r in sig if r.get("kind") == "block"]
    if level == "block" or (level == "auto" and blocks):
        return pd.DataFrame([{c: r.get(c) for c in SIGNAL_COLUMNS} | {"source": "probe"} for r in blocks],
                            columns=SIGNAL_COLUMNS)  # fmt: skip
    tr = ctx.train
    out = []
    if len(tr):
        d = tr[tr.output == ""]
        for r in d.itertuples():
            m = np.asarray(r.ch_mean, dtype=np.float64)
            v = np.asarray(r.ch_var, dtype=np.float64)
            out.append({"source": "stats", "when": "train", "step": int(r.step),
                        "order": ctx.call_order.get((r.layer, int(r.call)), 10**9), "layer": r.layer,
                        "call": int(r.call), "kind": "layer", "avg_sq_mean": float(np.nanmean(m * m)),
                        "avg_var": float(np.nanmean(v)), "branch_var": float("nan")})  # fmt: skip
    df = pd.DataFrame(out, columns=SIGNAL_COLUMNS)
    return df.sort_values(["step", "order"]).reset_index(drop=True) if len(df) else df
