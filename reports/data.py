"""Figure data for the HTML report: pure functions of a Run (numpy/pandas, no matplotlib).

Every plot in the report is drawn from one of these, and the tests check them against the
run's statistics directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from normscope.analyze.quantities import dead_fraction, drift, irregular_steps, regular_rows
from normscope.roles import relu_layers


@dataclass
class Heatmap:
    title: str
    rows: list[str]  # layer labels in execution order
    steps: np.ndarray  # step (or first step of a bin) per column
    values: np.ndarray  # rows × columns
    log: bool = False
    unit: str = ""
    empty_text: str = "no data recorded"
    fixed: tuple[float, float] | None = None  # a fixed colour scale (fractions: 0–1)
    na_text: str = ""  # what an all-NaN row means (not applicable), shown in a legend
    irregular: np.ndarray | None = None  # per column: holds a remainder (irregular) batch
    note: str = ""  # what the plot leaves out or clips, said under its title
    clip: bool = False  # colour scale clipped to the 1st–99th percentile


def layer_label(layer: str, call: int, module_type: str | None) -> str:
    """A layer's name as the report shows it: Sequential children are bare indices ("3"), so the
    type goes with them ("3 · ReLU"); a second call of a module is "name#1"."""
    name = layer if call == 0 else f"{layer}#{call}"
    tail = layer.rsplit(".", 1)[-1]
    if module_type and tail.isdigit():
        return f"{name} · {module_type}"
    return name


def train_batch_sizes(run) -> pd.Series:
    """Samples per sampled training step (first hooked layer's rows of the train phase; merged
    eval passes are not batches), indexed by step."""
    s = run.stats
    s = s[(s.phase == "train") & (s.output != "input")]
    if not len(s):
        return pd.Series(dtype=np.int64)
    first = s.groupby(["layer", "call"], sort=False).ngroup() == 0
    return s[first.to_numpy()].groupby("step")["samples"].max().astype(np.int64)


def batch_size_text(run) -> str:
    """The usual training batch size (the most common one), with the remainder batches named."""
    b = train_batch_sizes(run)
    if not len(b):
        return "?"
    counts = b.value_counts()
    main = int(counts.index[0])
    other = b[b != main]
    if not len(other):
        return str(main)
    sizes = ", ".join(str(int(v)) for v in sorted(other.unique()))
    return f"{main} ({len(other)} sampled step(s) with {sizes}: remainder batches)"


def layer_rows(run) -> pd.DataFrame:
    """Hooked layer calls in execution order with the output recorded for each (main output)."""
    order = run.layers
    s = run.stats
    if not len(order):
        keys = s[["layer", "call"]].drop_duplicates()
        order = keys.assign(order=range(len(keys)), module_type=None)
    main = s[s.output != "input"].groupby(["layer", "call"], sort=False)["output"].first()
    rows = []
    for r in order.itertuples(index=False):
        out = main.get((r.layer, r.call))
        if out is None:
            continue
        label = layer_label(r.layer, r.call, r.module_type)
        rows.append({"layer": r.layer, "call": r.call, "output": out, "label": label, "module_type": r.module_type})
    return pd.DataFrame(rows, columns=["layer", "call", "output", "label", "module_type"])


def _pivot(df: pd.DataFrame, rows: pd.DataFrame, value: str) -> tuple[np.ndarray, np.ndarray]:
    """rows × steps matrix of ``value`` (NaN where missing)."""
    if not len(df) or not len(rows):
        return np.zeros((len(rows), 0)), np.zeros(0, dtype=np.int64)
    keyed = df.set_index(["layer", "call", "output", "step"])[value]
    keyed = keyed[~keyed.index.duplicated(keep="last")]
    wide = keyed.unstack("step")
    steps = np.array(sorted(wide.columns), dtype=np.int64)
    idx = pd.MultiIndex.from_frame(rows[["layer", "call", "output"]])
    wide = wide.reindex(index=idx, columns=steps)
    return wide.to_numpy(dtype=np.float64), steps


def downsample_steps(values: np.ndarray, steps: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Average consecutive columns into at most ``max_cols`` bins (NaN-aware)."""
    n = values.shape[1]
    if n <= max_cols:
        return values, steps
    edges = np.linspace(0, n, max_cols + 1).astype(int)
    out = np.full((values.shape[0], max_cols), np.nan)
    for j in range(max_cols):
        block = values[:, edges[j] : edges[j + 1]]
        with np.errstate(all="ignore"):
            cnt = np.isfinite(block).sum(1)
            tot = np.nansum(np.where(np.isfinite(block), block, 0), 1)
            out[:, j] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return out, steps[edges[:-1]]


def downsample_rows(values: np.ndarray, labels: list[str], max_rows: int) -> tuple[np.ndarray, list[str]]:
    """Keep at most ``max_rows`` evenly spaced rows (first and last always kept)."""
    n = values.shape[0]
    if n <= max_rows:
        return values, labels
    keep = np.unique(np.linspace(0, n - 1, max_rows).round().astype(int))
    return values[keep], [labels[i] for i in keep]


def drift_table(run, phase: str = "train") -> pd.DataFrame:
    """Per layer output and sampled step: drift to the previous regular sampled step (``drift``: the
    mean symmetric KL over live channels, computed by normscope.analyze.quantities.drift); steps
    with a remainder batch (quantities.irregular_steps) are left out on both sides."""
    df = drift(regular_rows(run.stats[run.stats.phase == phase]), lag=1)  # remainder batches left out
    return df.rename(columns={"sym_kl": "drift"})[["layer", "call", "output", "step", "drift"]]


def _log_drift(d: pd.DataFrame) -> pd.DataFrame:
    """Drift spans decades (a batch of 4 samples can make a channel's variance ~0): plot log10."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return d.assign(log_drift=np.log10(d["drift"].clip(lower=1e-6)))


def train_grads(run, phase: str = "train") -> pd.DataFrame:
    """The phase's gradient rows, less those of steps a loss scaler skipped (overflowed, discarded)."""
    g = run.grads
    g = g[g.phase == phase] if len(g) else g
    skipped = run.skipped_steps
    return g[~g.step.isin(skipped)] if skipped and len(g) else g


def heatmaps(run, phase: str = "train", max_cols: int = 200, max_rows: int = 120) -> list[Heatmap]:
    rows = layer_rows(run)
    s = run.stats[(run.stats.phase == phase) & (run.stats.output != "input")].copy()
    g = train_grads(run, phase)
    labels = rows["label"].tolist()
    relu = relu_layers(run.modules)
    s["dead"] = dead_fraction(s, relu) if len(s) else []
    sat_layers = set(run.meta.get("saturation", {}))
    s_sat = s.copy()
    s_sat.loc[~s_sat.layer.isin(sat_layers), "frac_sat"] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        s["log_std"] = np.log10(s["std"].where(s["std"] > 0))
        g = g.assign(log_rms=np.log10(g["rms"].where(g["rms"] > 0)))
    irr = set(irregular_steps(s).tolist())
    n_irr = len(irr)
    irr_note = (f"▼ {n_irr} sampled step(s) with a remainder batch (smaller last batch of an epoch)"
                if n_irr else "")  # fmt: skip
    drift_note = "remainder batches left out; " if n_irr else ""
    specs = [
        ("Dead units (ReLU family: fraction never > 0 in the batch)", s, "dead", False, "fraction",
         "no ReLU-family layer", (0.0, 1.0), "not a ReLU-family layer", irr_note, False),
        ("Saturated fraction (sigmoid/tanh/hardtanh)", s_sat, "frac_sat", False, "fraction",
         "no saturating layer (sigmoid, tanh, hardtanh)", (0.0, 1.0), "not a saturating layer", irr_note, False),
        ("Activation std", s, "log_std", True, "log10 std", "no data recorded", None, "", irr_note, False),
        ("Gradient RMS w.r.t. layer output", g, "log_rms", True, "log10 RMS", "no gradient recorded", None,
         "no gradient recorded", irr_note, False),
        ("Drift: symmetric KL to the previous sampled step", _log_drift(drift_table(run, phase)), "log_drift", True,
         "log10 nats", "needs two sampled steps", None, "no channel statistics",
         f"{drift_note}colours clipped to the 1st–99th percentile", True),
    ]  # fmt: skip
    out = []
    for title, df, col, log, unit, empty, fixed, na, note, clip in specs:
        vals, steps = _pivot(df, rows, col)
        flags = np.array([int(t) in irr for t in steps], dtype=bool)
        vals, steps2 = downsample_steps(vals, steps, max_cols)
        if len(steps2) != len(steps):  # a bin holds a remainder batch when any of its steps does
            edges = np.searchsorted(steps, steps2)
            flags = np.array([flags[a:b].any() for a, b in zip(edges, [*edges[1:], len(steps)])], dtype=bool)
        vals, lab = downsample_rows(vals, labels, max_rows)
        out.append(Heatmap(title, lab, steps2, vals, log=log, unit=unit, empty_text=empty, fixed=fixed, na_text=na,
                           irregular=flags, note=note if col != "log_drift" or len(steps) else "", clip=clip))  # fmt: skip
    return out


def gradient_flow(run, n_steps: int = 4, phase: str = "train") -> tuple[list[str], dict[int, np.ndarray]]:
    """Per-layer gradient RMS along depth for a few sampled steps (first ... last)."""
    rows = layer_rows(run)
    vals, steps = _pivot(train_grads(run, phase), rows, "rms")
    if not len(steps):
        return rows["label"].tolist(), {}
    pick = np.unique(np.linspace(0, len(steps) - 1, min(n_steps, len(steps))).round().astype(int))
    return rows["label"].tolist(), {int(steps[i]): vals[:, i] for i in pick}


def layer_table(run, flagged: set[str] | None = None, phase: str = "train") -> pd.DataFrame:
    """Every hooked layer call with its key numbers at its last recorded step."""
    rows = layer_rows(run)
    s = run.stats[(run.stats.phase == phase) & (run.stats.output != "input")]
    if not len(s):
        s = run.stats[run.stats.output != "input"]
    last = s.sort_values("step").groupby(["layer", "call", "output"]).tail(1).set_index(["layer", "call", "output"])
    g = train_grads(run, phase).sort_values("step").groupby(["layer", "call", "output"]).tail(1)
    g = g.set_index(["layer", "call", "output"])
    p = run.params.sort_values("step")
    ratio = {}
    if len(p):
        lastp = p[p.step == p.step.max()]
        for layer, grp in lastp.groupby("layer"):
            w = float(np.sqrt((grp["norm"] ** 2).sum()))
            du = float(np.sqrt((grp["update_norm"] ** 2).sum()))
            ratio[layer] = du / w if w > 0 and math.isfinite(du) else math.nan
    flagged = flagged or set()
    relu = relu_layers(run.modules)
    if len(last):
        last = last.assign(dead=dead_fraction(last.reset_index(), relu).to_numpy())
    out = []
    for r in rows.itertuples(index=False):
        key = (r.layer, r.call, r.output)
        row = last.loc[key] if key in last.index else None
        grow = g.loc[key] if key in g.index else None
        dead = float(row["dead"]) if row is not None else math.nan
        out.append({
            "label": r.label, "layer": r.layer, "call": r.call, "module_type": r.module_type,
            "step": int(row["step"]) if row is not None else -1,
            "mean": row["mean"] if row is not None else math.nan,
            "std": row["std"] if row is not None else math.nan,
            "frac_zero": row["frac_zero"] if row is not None else math.nan,
            "dead": dead,
            "frac_sat": row["frac_sat"] if row is not None else math.nan,
            "nonfinite": int(row["nan_count"] + row["inf_count"]) if row is not None else 0,
            "grad_rms": grow["rms"] if grow is not None else math.nan,
            "update_ratio": ratio.get(r.layer, math.nan),
            "flagged": r.layer in flagged,
        })  # fmt: skip
    return pd.DataFrame(out)


def layer_series(run, layer: str, call: int = 0, phase: str = "train") -> pd.DataFrame:
    """One layer call's rows over time (main output), sorted by step."""
    s = run.stats
    s = s[(s.layer == layer) & (s.call == call) & (s.phase == phase) & (s.output != "input")]
    if len(s):
        s = s[s.output == s.output.iloc[0]]
    return s.sort_values("step").reset_index(drop=True)


def thin(df: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """Evenly spaced rows (first and last kept): line plots need no more than a few hundred points."""
    if len(df) <= max_rows:
        return df
    keep = np.unique(np.linspace(0, len(df) - 1, max_rows).round().astype(int))
    return df.iloc[keep].reset_index(drop=True)
