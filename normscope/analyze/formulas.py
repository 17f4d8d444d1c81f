"""The formulas behind the checks, as small pure functions (numpy, float64). See CHECKS.md.

Each one has a unit test with hand-computed numbers (tests/analyze/test_analyze_formulas.py).
"""

from __future__ import annotations

import warnings

import numpy as np


def kl_gauss(mu1, var1, mu2, var2):
    """KL(N(μ₁,σ₁²) ‖ N(μ₂,σ₂²)) = ln(σ₂/σ₁) + (σ₁² + (μ₁−μ₂)²)/(2σ₂²) − ½ (elementwise)."""
    mu1, var1, mu2, var2 = (np.asarray(a, dtype=np.float64) for a in (mu1, var1, mu2, var2))
    return 0.5 * np.log(var2 / var1) + (var1 + (mu1 - mu2) ** 2) / (2.0 * var2) - 0.5


def sym_kl_gauss(mu1, var1, mu2, var2):
    """Symmetric KL: KL(1‖2) + KL(2‖1) = ((σ₁²−σ₂²)² + (σ₁²+σ₂²)(μ₁−μ₂)²) / (2σ₁²σ₂²)."""
    return kl_gauss(mu1, var1, mu2, var2) + kl_gauss(mu2, var2, mu1, var1)


def w2_sq_normalised(mu1, var1, mu2, var2):
    """Gaussian W₂² = (μ₁−μ₂)² + (σ₁−σ₂)², divided by the mean variance (σ₁²+σ₂²)/2."""
    mu1, var1, mu2, var2 = (np.asarray(a, dtype=np.float64) for a in (mu1, var1, mu2, var2))
    w2 = (mu1 - mu2) ** 2 + (np.sqrt(var1) - np.sqrt(var2)) ** 2
    return w2 / ((var1 + var2) / 2.0)


def channel_drift(mu1, var1, mu2, var2, rel_floor: float = 1e-4) -> tuple[float, float, int]:
    """Mean over channels of the symmetric KL and of the normalised W₂², and how many channels
    were used (channels whose variance is below ``rel_floor`` × the median channel variance in
    either moment set — dead or constant units — are left out)."""
    mu1, var1, mu2, var2 = (np.asarray(a, dtype=np.float64) for a in (mu1, var1, mu2, var2))
    both = np.concatenate([var1, var2])
    both = both[np.isfinite(both)]
    scale = max(float(np.median(both)) if both.size else 0.0, 1e-30)
    ok = np.isfinite(mu1) & np.isfinite(mu2) & (var1 > rel_floor * scale) & (var2 > rel_floor * scale)
    if not ok.any():
        return float("nan"), float("nan"), 0
    a = (mu1[ok], var1[ok], mu2[ok], var2[ok])
    return float(np.mean(sym_kl_gauss(*a))), float(np.mean(w2_sq_normalised(*a))), int(ok.sum())


def channel_drift_rows(mu1, var1, mu2, var2, rel_floor: float = 1e-4) -> tuple:
    """:func:`channel_drift` for many pairs at once: row r of the (R, C) arrays is one pair of
    moment sets. Returns per-row arrays (sym KL, W₂², channels used); NaN where none is used."""
    mu1, var1, mu2, var2 = (np.asarray(a, dtype=np.float64) for a in (mu1, var1, mu2, var2))
    if mu1.ndim != 2 or mu1.shape[0] == 0:
        z = np.zeros(mu1.shape[0] if mu1.ndim == 2 else 0)
        return z * np.nan, z * np.nan, z.astype(np.int64)
    both = np.concatenate([var1, var2], axis=1)
    both = np.where(np.isfinite(both), both, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no scale, no channel
        med = np.nanmedian(both, axis=1)
    scale = np.maximum(np.where(np.isfinite(med), med, 0.0), 1e-30)[:, None]
    ok = np.isfinite(mu1) & np.isfinite(mu2) & (var1 > rel_floor * scale) & (var2 > rel_floor * scale)
    n = ok.sum(axis=1)
    with np.errstate(all="ignore"):
        kl = np.where(ok, sym_kl_gauss(mu1, var1, mu2, var2), 0.0).sum(axis=1)
        w2 = np.where(ok, w2_sq_normalised(mu1, var1, mu2, var2), 0.0).sum(axis=1)
        kl = np.where(n > 0, kl / np.maximum(n, 1), np.nan)
        w2 = np.where(n > 0, w2 / np.maximum(n, 1), np.nan)
    return kl, w2, n.astype(np.int64)


def dropout_train_moments(c, v, retain):
    """Mean and variance of dropout(x) in training (x·m/q, m ~ Bernoulli(q)) for x of mean c,
    variance v: mean c, variance (c² + v)/q − c²."""
    c, v = np.asarray(c, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return c, (c * c + v) / retain - c * c


def variance_shift_closed_form(retain, c, v):
    """Li et al. 2019: Var_test / Var_train = Δ(q) = v / ((c² + v)/q − c²) for retain
    probability q (= 1 − nn.Dropout's p); Δ = q when c = 0."""
    c, v = np.asarray(c, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return v / ((c * c + v) / retain - c * c)


def uout_variance_shift(beta):
    """Uout dropout x(1+r), r ~ U(−β, β): Δ = 3 / (3 + β²)."""
    return 3.0 / (3.0 + np.asarray(beta, dtype=np.float64) ** 2)


def shift_factor(ratio):
    """max(r, 1/r): how far a variance ratio is from 1, in either direction."""
    r = np.asarray(ratio, dtype=np.float64)
    return np.maximum(r, 1.0 / r)


def input_moments_from_dropout_output(mean, var, retain):
    """Invert :func:`dropout_train_moments`: from dropout's train-mode output moments (c, V)
    recover the input's (c, v) with v = q(V + c²) − c²."""
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    return mean, retain * (var + mean * mean) - mean * mean


def update_ratio(update_norm, norm):
    """‖Δw‖ / ‖w‖ (NaN where ‖w‖ = 0)."""
    u, n = np.asarray(update_norm, dtype=np.float64), np.asarray(norm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, u / n, np.nan)


def effective_lr(lr, norm):
    """η / ‖w‖² for scale-invariant weights (van Laarhoven 2017; Hoffer et al. 2018)."""
    lr, n = np.asarray(lr, dtype=np.float64), np.asarray(norm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, lr / (n * n), np.nan)


def dormant_scores(mean_abs):
    """Sokar et al. 2023: s_i = E|h_i| / mean_k E|h_k| (all zeros when the layer is silent)."""
    m = np.asarray(mean_abs, dtype=np.float64)
    avg = float(np.mean(m)) if m.size else 0.0
    if avg <= 0:
        return np.zeros_like(m)
    return m / avg


def population_moments(count, s1, s2):
    """PreciseBN: mean = Σx/n, var = E[x²] − E[x]² with equal weight per element."""
    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(s1, dtype=np.float64) / count
    var = np.maximum(np.asarray(s2, dtype=np.float64) / count - mean * mean, 0.0)
    return mean, var


def stale_stats(running_mean, running_var, pop_mean, pop_var, eps: float = 1e-5):
    """Per channel: |Δμ| in population σ units and the variance ratio running/population."""
    rm, rv, pm, pv = (np.asarray(a, dtype=np.float64) for a in (running_mean, running_var, pop_mean, pop_var))
    dmu = np.abs(rm - pm) / np.sqrt(pv + eps)
    ratio = (rv + eps) / (pv + eps)
    return dmu, ratio


def bn_running_ema(batch_means, batch_vars, counts, momentum, steps=None, init_mean=0.0, init_var=1.0):
    """The running statistics BatchNorm would hold after seeing these batches (rows: steps).

    BN updates r ← (1 − m)·r + m·b per forward, with the unbiased batch variance v·n/(n − 1);
    ``momentum=None`` is the cumulative average. ``steps`` (sampled step indices) lets rows be
    sparser than every step: a gap of k steps applies the momentum k times with the sampled
    batch standing for the unseen ones (exact when every step is sampled)."""
    m_ = np.asarray(batch_means, dtype=np.float64)
    v_ = np.asarray(batch_vars, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64).reshape(-1, 1)
    v_ = v_ * n / np.maximum(n - 1, 1)
    t = len(m_)
    rm = np.full(m_.shape[1], init_mean, dtype=np.float64)
    rv = np.full(m_.shape[1], init_var, dtype=np.float64)
    if momentum is None:
        return (m_.mean(0), v_.mean(0)) if t else (rm, rv)
    steps = np.arange(t) if steps is None else np.asarray(steps)
    gaps = np.diff(np.concatenate([[steps[0] - 1], steps])) if t else []
    for i in range(t):
        keep = (1.0 - momentum) ** max(int(gaps[i]), 1)
        rm = keep * rm + (1 - keep) * m_[i]
        rv = keep * rv + (1 - keep) * v_[i]
    return rm, rv


def geometric_rate(values) -> float:
    """Per-step factor of a geometric trend: exp of the least-squares slope of ln(values)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return float("nan")
    x = np.arange(v.size, dtype=np.float64)[ok]
    slope = np.polyfit(x, np.log(v[ok]), 1)[0]
    return float(np.exp(slope))
