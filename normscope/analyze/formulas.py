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


CONST_REL = 1e-5  # a channel whose std is below this fraction of its |mean| holds one value (float32 rounding)


def _drift_channels(mu1, var1, mu2, var2, scale, rel_floor):
    """The channels a drift is measured on: finite means, a variance above ``rel_floor`` × the
    ``scale`` (the median channel variance; below it: dead units) and above (CONST_REL·μ)² in
    both moment sets (below it a channel holds one value in every sample — an embedding of a
    single token type, a bias alone — whose Gaussian KL is a float32 rounding artefact)."""
    with np.errstate(all="ignore"):
        return (np.isfinite(mu1) & np.isfinite(mu2) & (var1 > rel_floor * scale) & (var2 > rel_floor * scale)
                & (var1 > (CONST_REL * mu1) ** 2) & (var2 > (CONST_REL * mu2) ** 2))  # fmt: skip


def channel_drift(mu1, var1, mu2, var2, rel_floor: float = 1e-4) -> tuple[float, float, int]:
    """Mean over channels of the symmetric KL and of the normalised W₂², and how many channels
    were used (channels whose variance is below ``rel_floor`` × the median channel variance in
    either moment set — dead units — or that are constant over the samples are left out)."""
    mu1, var1, mu2, var2 = (np.asarray(a, dtype=np.float64) for a in (mu1, var1, mu2, var2))
    both = np.concatenate([var1, var2])
    both = both[np.isfinite(both)]
    scale = max(float(np.median(both)) if both.size else 0.0, 1e-30)
    ok = _drift_channels(mu1, var1, mu2, var2, scale, rel_floor)
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
    ok = _drift_channels(mu1, var1, mu2, var2, scale, rel_floor)
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


def bn_running_ema(batch_means, batch_vars, counts, momentum, steps=None, until=None, init_mean=0.0, init_var=1.0):
    """The running statistics BatchNorm would hold after seeing these batches (rows: steps), and
    how far off that rebuild may be: ``(mean, var, sd_mean, sd_var)``, per channel.

    BN updates r ← (1 − m)·r + m·b per forward, with the unbiased batch variance v·n/(n − 1);
    ``momentum=None`` is the cumulative average. ``steps`` are the rows' step indices (default
    0, 1, …) and ``until`` the number of forwards BN ran (default: the last step + 1). With every
    step recorded the rebuild is exact and the sds are 0. With gaps, the batch statistics of the
    steps between two recorded ones are interpolated linearly, and held at the last recorded value
    after it. The sds then bound the rebuild's error: the leave-one-out interpolation residual of
    the recorded rows, taken as fully correlated within each gap and weighted by the gap's share
    of the average, plus the drift the last two rows show, over the unrecorded tail. They are inf
    when fewer than three rows leave gaps (nothing to estimate the residual from)."""
    m_ = np.asarray(batch_means, dtype=np.float64)
    v_ = np.asarray(batch_vars, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64).reshape(-1, 1)
    v_ = v_ * n / np.maximum(n - 1, 1)
    rows, ch = m_.shape if m_.ndim == 2 else (0, 0)
    s = np.arange(rows) if steps is None else np.asarray(steps, dtype=np.int64)
    if rows == 0:
        z = np.zeros(ch)
        return np.full(ch, init_mean, float), np.full(ch, init_var, float), z, z
    if (np.diff(s) <= 0).any() or s[0] < 0:
        raise ValueError("steps must be increasing and non-negative")
    T = int(s[-1]) + 1 if until is None else int(until)
    if T < s[-1] + 1:
        raise ValueError(f"until ({T}) must exceed the last step ({int(s[-1])})")
    t = np.arange(T)
    if momentum is None:
        w = np.full(T, 1.0 / T)
        w_init = 0.0
    else:
        w = float(momentum) * (1.0 - float(momentum)) ** (T - 1 - t)  # step t's weight in the final average
        w_init = (1.0 - float(momentum)) ** T
    # each step's batch statistic as a combination of the recorded rows: linear between rows, held outside
    right = np.clip(np.searchsorted(s, t, side="left"), 0, rows - 1)
    left = np.where(t > s[-1], rows - 1, np.clip(np.where(s[right] == t, right, right - 1), 0, rows - 1))
    span = (s[right] - s[left]).astype(np.float64)
    lam = np.where(span > 0, (t - s[left]) / np.where(span > 0, span, 1.0), 0.0)
    coef = np.zeros(rows)
    np.add.at(coef, left, w * (1.0 - lam))
    np.add.at(coef, right, w * lam)
    mean = coef @ m_ + w_init * init_mean
    var = coef @ v_ + w_init * init_var
    seen = np.zeros(T, dtype=bool)
    seen[s] = True
    if seen.all():
        z = np.zeros(ch)
        return mean, var, z, z
    if rows < 3:
        inf = np.full(ch, np.inf)
        return mean, var, inf, inf
    # unrecorded steps' weights, summed per gap (gap g: between rows g and g + 1; the tail after the last row)
    gap = np.searchsorted(s, t, side="right") - 1  # the row at or before each step (-1: before the first row)
    block = np.bincount(gap[~seen] + 1, weights=w[~seen], minlength=rows + 1)
    frac = ((s[1:-1] - s[:-2]) / (s[2:] - s[:-2]))[:, None]
    out = []
    for x in (m_, v_):
        resid = x[1:-1] - (x[:-2] + (x[2:] - x[:-2]) * frac)  # each interior row against its neighbours' line
        sig2 = (resid**2).mean(0)
        err2 = (block**2).sum() * sig2
        slope = (x[-1] - x[-2]) / float(s[-1] - s[-2])
        err2 = err2 + (np.abs(slope) * (w * np.clip(t - s[-1], 0, None)).sum()) ** 2
        out.append(np.sqrt(err2))
    return mean, var, out[0], out[1]


def bn_merge_error(momentum, k: int, micro: float) -> tuple[float, float]:
    """How far a rebuild from merged rows is off, for K forwards a step of ``micro`` samples: the
    sd of its error (of the mean, in σ; of the variance, relative; realised/predicted ≈ 1 on
    simulated BN, tests/analyze/test_analyze_formulas.py). BN's K updates weigh the micro-batches by
    c_j = m·(1 − m)^(K−1−j); the rebuild gives each the merged moments, so a step's error is
    Σ (c_j − c̄)·(μ_j − μ̄), with Var μ_j ≤ σ²/b (b samples; positions within a sample counted as
    one) and Var v_j ≈ 2σ⁴/b, independent from step to step under the running average's decay
    (1 − m)^K a step. The merged variance also holds the micro-batch means' spread, which BN's
    per-micro-batch variances do not: at most (K − 1)/(K·b) of it, added to the variance's bound.
    A cumulative average (momentum None) weighs every forward alike: only that spread remains."""
    b = max(float(micro), 1.0)
    bias = (k - 1) / (k * b)
    if momentum is None:
        return 0.0, bias
    m = float(momentum)
    c = m * (1.0 - m) ** (k - 1 - np.arange(k))
    spread = float(np.sqrt(((c - c.mean()) ** 2).sum()))
    decay = 1.0 - (1.0 - m) ** (2 * k)
    across = 1.0 / np.sqrt(decay) if decay > 0 else 0.0
    return spread * across / np.sqrt(b), bias + spread * across * np.sqrt(2.0 / b)


def geometric_rate(values) -> float:
    """Per-step factor of a geometric trend: exp of the least-squares slope of ln(values)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return float("nan")
    x = np.arange(v.size, dtype=np.float64)[ok]
    slope = np.polyfit(x, np.log(v[ok]), 1)[0]
    return float(np.exp(slope))
