"""Brute-force numpy references for every statistic normscope records."""

from __future__ import annotations

import numpy as np

from normscope.collect import reducers as R


def channel_view(x: np.ndarray, axis: int) -> np.ndarray:
    """(A, C, S) view: leading axes, channel axis, trailing axes."""
    if x.ndim == 0:
        return x.reshape(1, 1, 1)
    a = axis % x.ndim
    lead = int(np.prod(x.shape[:a], dtype=np.int64))
    trail = int(np.prod(x.shape[a + 1 :], dtype=np.int64))
    return x.reshape(lead, x.shape[a], trail)


def sat_mask(x: np.ndarray, sat) -> np.ndarray:
    if sat is None:
        return np.zeros(x.shape, bool)
    if sat.kind == "sigmoid":
        return (x < 0.01) | (x > 0.99)
    if sat.kind == "tanh":
        return np.abs(x) > 0.97
    return (x <= sat.lo) | (x >= sat.hi)


def hist_bins_ref(y: np.ndarray, spec) -> np.ndarray:
    """Bin index per value from explicit float64 edges (searchsorted), independent of bit tricks."""
    y = y.astype(np.float64)
    if spec.kind == "symlog":
        mags = 2.0 ** np.arange(R.SYMLOG_LO_EXP, R.SYMLOG_HI_EXP + 1)
        j = np.searchsorted(mags, np.abs(y), side="right")
        return (R.SYMLOG_K + 1 + np.sign(y) * j).astype(np.int64)
    inner = np.linspace(spec.lo, spec.hi, R.LINEAR_BINS + 1)[1:-1]
    return np.searchsorted(inner, y, side="right").astype(np.int64)


def near_edge(y: np.ndarray, spec, rel: float = 1e-5) -> int:
    """Values within float rounding of a linear bin edge (symlog edges are exact: none)."""
    if spec.kind == "symlog":
        return 0
    y = y.astype(np.float64)
    edges = np.linspace(spec.lo, spec.hi, R.LINEAR_BINS + 1)
    scale = np.maximum(np.abs(edges), 1e-30)
    d = np.abs(y[:, None] - edges[None, :]) <= rel * scale[None, :] + 1e-12
    return int(d.any(1).sum())


def act_stats(x: np.ndarray, axis: int, spec, sat, hist_max: int) -> dict:
    """Every forward statistic of one tensor, by brute force in float64."""
    x32 = x.astype(np.float32)
    x = x32.astype(np.float64)
    fin = np.isfinite(x)
    xf = x[fin]
    v = channel_view(x, axis)
    fv = channel_view(fin, axis)
    a, c, s = v.shape
    ch_mean = np.array([v[:, k, :][fv[:, k, :]].mean() if fv[:, k, :].any() else np.nan for k in range(c)])
    ch_var = np.array([v[:, k, :][fv[:, k, :]].var() if fv[:, k, :].any() else np.nan for k in range(c)])
    pos = np.where(fv, v, 0) > 0
    active = pos.any(2).sum(0)
    flat = x.reshape(-1)
    stride = R.hist_stride(flat.size, hist_max)
    sub = flat[::stride]
    sub = sub[np.isfinite(sub)]
    hist = np.bincount(hist_bins_ref(sub, spec), minlength=spec.bins)
    return {
        "count": x.size,
        "samples": a,
        "mean": xf.mean() if xf.size else np.nan,
        "std": xf.std() if xf.size else np.nan,
        "min": xf.min() if xf.size else np.nan,
        "max": xf.max() if xf.size else np.nan,
        "mean_abs": np.abs(xf).mean() if xf.size else np.nan,
        "frac_zero": (xf == 0).mean() if xf.size else np.nan,
        "frac_nonpos": (xf <= 0).mean() if xf.size else np.nan,
        "frac_sat": sat_mask(xf, sat).mean() if xf.size else np.nan,
        "nan_count": int(np.isnan(x).sum()),
        "inf_count": int(np.isinf(x).sum()),
        "ch_mean": ch_mean,
        "ch_var": ch_var,
        "active": active,
        "hist": hist,
        "hist_count": sub.size,
        "_hist_slack": near_edge(sub, spec),
    }


def grad_stats(g: np.ndarray) -> dict:
    g = g.astype(np.float32).astype(np.float64)
    fin = np.isfinite(g)
    gf = g[fin]
    return {
        "count": g.size,
        "norm": np.sqrt((gf**2).sum()),
        "rms": np.sqrt((gf**2).mean()) if gf.size else np.nan,
        "max_abs": np.abs(gf).max() if gf.size else np.nan,
        "nan_count": int(np.isnan(g).sum()),
        "inf_count": int(np.isinf(g).sum()),
    }
