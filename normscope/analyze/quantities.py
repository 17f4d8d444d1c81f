"""Quantities derived from the recorded statistics, each computed in exactly one place.

The checks, the HTML report and the TensorBoard export all read these functions, so a number
shown in a plot is the number a check judged:

- :func:`irregular_steps` / :func:`regular_rows`: the remainder batches (smaller last batch of
  an epoch) that step-to-step quantities should leave out;
- :func:`drift` / :func:`covariate_shift`: per-channel Gaussian drift between sampled steps
  (symmetric KL and normalised W₂², dead or constant channels left out; CHECKS.md);
- :func:`dead_fraction`: per recorded row of a ReLU-family layer, the fraction of units that
  were never > 0 in any sample of that batch (:func:`normscope.roles.relu_layers` says which
  layers are ReLU-family);
- :func:`signal_propagation`: average channel squared mean and variance along depth;
- :func:`weight_sparsity`: per weight tensor, the fraction of |w| below r·max|w| (from a model);
- :func:`first_output_rms`: each layer's output RMS √(mean² + std²) at the first recorded step.

They are pure functions of a run's rows or a model's weights (no plotting).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from normscope.analyze.formulas import channel_drift_rows

if TYPE_CHECKING:
    import pandas as pd

SIGNAL_COLUMNS = ["source", "when", "step", "order", "layer", "call", "kind", "avg_sq_mean", "avg_var", "branch_var"]
DRIFT_COLUMNS = ["step", "prev_step", "layer", "call", "output", "sym_kl", "w2", "channels"]
BIG_ORDER = 10**9


def _ctx(run):
    from normscope.analyze.context import Context
    from normscope.analyze.engine import as_run

    if isinstance(run, Context):
        return run
    return Context(as_run(run))


def _stack(col) -> np.ndarray | None:
    """Rows of equal-length arrays as one (R, C) float64 array; None when lengths differ."""
    vals = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col, dtype=object)
    if not len(vals):
        return np.zeros((0, 0))
    lens = np.fromiter((len(v) for v in vals), dtype=np.int64, count=len(vals))
    if (lens != lens[0]).any():
        return None
    return np.stack(vals).astype(np.float64, copy=False).reshape(len(vals), int(lens[0]))


def irregular_steps(rows: pd.DataFrame) -> np.ndarray:
    """Sampled steps whose batch is not the usual one: the remainder batch that ends an epoch (or
    any step whose ``samples`` differ from the most common value). Statistics of a smaller batch
    are noisier and biased (fewer samples for "never active", a variance from 29 samples), so a
    step-to-step quantity across it measures the batch, not the training: :func:`regular_rows`."""
    if not len(rows) or "samples" not in rows:
        return np.zeros(0, dtype=np.int64)
    per_step = rows.groupby("step")["samples"].max()
    if not len(per_step):
        return np.zeros(0, dtype=np.int64)
    usual = per_step.value_counts().index[0]
    return np.asarray(sorted(per_step.index[per_step != usual]), dtype=np.int64)


def regular_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` without the :func:`irregular_steps` (remainder batches)."""
    irr = irregular_steps(rows)
    return rows[~rows["step"].isin(irr)] if len(irr) else rows


def drift(rows: pd.DataFrame, lag: int = 1, call_order: dict | None = None) -> pd.DataFrame:
    """Drift of each layer output between sampled steps t and t' ≤ t − ``lag`` (the nearest such
    earlier sampled step; ``lag=1``: the previous sampled step), from the rows' per-channel
    moments: mean over channels of the symmetric Gaussian KL and of W₂² / σ², and how many
    channels were used (channels with variance below 1e-4 × the median are dead or constant and
    left out). One row per (layer, call, output) and later step; columns :data:`DRIFT_COLUMNS`.
    """
    import pandas as pd

    parts = []
    if len(rows):
        for (layer, call, output), d in rows.groupby(["layer", "call", "output"], sort=False):
            if len(d) < 2:
                continue
            d = d.sort_values("step", kind="stable")
            steps = d.step.to_numpy(dtype=np.int64)
            m, v = _stack(d.ch_mean), _stack(d.ch_var)
            if m is None or v is None or m.shape[1] == 0:
                continue
            i = np.arange(1, len(d))
            j = np.minimum(np.searchsorted(steps, steps[i] - lag, side="right") - 1, i - 1)
            keep = j >= 0
            i, j = i[keep], j[keep]
            if not len(i):
                continue
            kl, w2, n = channel_drift_rows(m[j], v[j], m[i], v[i])
            parts.append(pd.DataFrame({"step": steps[i], "prev_step": steps[j], "layer": str(layer), "call": int(call),
                                       "output": str(output), "sym_kl": kl, "w2": w2, "channels": n}))  # fmt: skip
    if not parts:
        return pd.DataFrame(columns=DRIFT_COLUMNS)
    df = pd.concat(parts, ignore_index=True)[DRIFT_COLUMNS]
    if call_order:
        df["_o"] = [call_order.get((a, int(b)), BIG_ORDER) for a, b in zip(df.layer, df.call)]
        df = df.sort_values(["_o", "output", "step"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return df


def covariate_shift(run, lag: int = 10) -> pd.DataFrame:
    """:func:`drift` of every train-phase layer output (and normalisation input) of ``run`` (a Run,
    a run directory or a check Context) between steps ``lag`` training steps apart, in execution
    order, up to the first non-finite step."""
    ctx = _ctx(run)
    return drift(ctx.train, lag=lag, call_order=ctx.call_order)


def dead_fraction(rows: pd.DataFrame, relu: Iterable[str]) -> pd.Series:
    """Per row: the fraction of units never > 0 in any sample of that batch (``active == 0``), for
    rows of the ReLU-family layers ``relu``; NaN for every other row (a Linear or BN output
    below zero is not a dead unit)."""
    import pandas as pd

    relu = set(relu)
    out = np.full(len(rows), np.nan)
    if len(rows) and relu:
        mask = rows["layer"].isin(relu).to_numpy()
        idx = np.flatnonzero(mask)
        act = rows["active"].to_numpy()[idx] if len(idx) else []
        lens = np.fromiter((len(a) for a in act), dtype=np.int64, count=len(idx))
        for n in np.unique(lens):
            if n == 0:
                continue
            sel = np.flatnonzero(lens == n)
            arr = np.stack(act[sel]).reshape(len(sel), int(n))
            out[idx[sel]] = (arr == 0).mean(axis=1)
    return pd.Series(out, index=rows.index, dtype=np.float64)


def signal_propagation(run, level: str = "auto") -> pd.DataFrame:
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
                        "order": ctx.call_order.get((r.layer, int(r.call)), BIG_ORDER), "layer": r.layer,
                        "call": int(r.call), "kind": "layer", "avg_sq_mean": float(np.nanmean(m * m)),
                        "avg_var": float(np.nanmean(v)), "branch_var": float("nan")})  # fmt: skip
    df = pd.DataFrame(out, columns=SIGNAL_COLUMNS)
    return df.sort_values(["step", "order"]).reset_index(drop=True) if len(df) else df


RELS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def weight_sparsity(model, rels=RELS) -> dict[str, dict]:
    """{param: {layer, numel, max_abs, frac_below: {"1e-03": f, ...}}} for weight tensors with ndim ≥ 2."""
    import torch

    out = {}
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() < 2 or w.numel() == 0:
                continue
            a = w.detach().abs().double()
            if not bool(torch.isfinite(a).all()):
                continue  # non-finite weights: non-finite reports them
            mx = float(a.max())
            fr = {f"{r:.0e}": float((a < r * mx).double().mean()) if mx > 0 else 1.0 for r in rels}
            out[name] = {"layer": name.rsplit(".", 1)[0] if "." in name else "<root>", "numel": int(w.numel()),
                         "max_abs": mx, "frac_below": fr}  # fmt: skip
    return out


def first_output_rms(rows: pd.DataFrame) -> dict[str, float]:
    """layer → RMS √(mean² + std²) of its output (call 0) at the first step of ``rows`` (activation
    rows of one phase): the scale the signal starts with, layer by layer."""
    if not len(rows):
        return {}
    d = rows[(rows.output == "") & (rows.call == 0)]
    d = d[d.step == d.step.min()]
    return {str(r.layer): float(np.hypot(r.mean, r.std)) for r in d.itertuples() if np.isfinite(r.mean)}
