"""Every formula behind the checks against hand-computed numbers."""

import math

import numpy as np
import pytest

from normscope.analyze import formulas as F


def test_kl_gauss_hand_computed():
    # KL(N(0,1) || N(1,4)) = ln 2 + (1 + 1)/8 - 1/2 = 0.693147 - 0.25
    assert F.kl_gauss(0, 1, 1, 4) == pytest.approx(math.log(2) + 2 / 8 - 0.5, abs=1e-12)
    # identical Gaussians: 0
    assert F.kl_gauss(3.0, 2.0, 3.0, 2.0) == pytest.approx(0.0, abs=1e-15)
    # KL(N(1,4) || N(0,1)) = ln(1/2) + (4 + 1)/2 - 1/2 = -0.693147 + 2
    assert F.kl_gauss(1, 4, 0, 1) == pytest.approx(-math.log(2) + 2.0, abs=1e-12)


def test_symmetric_kl_closed_form():
    # equal variances σ²: sym KL = (μ1-μ2)²/σ²
    assert F.sym_kl_gauss(0, 4, 1, 4) == pytest.approx(1 / 4)
    # (0,1) vs (1,4): 0.443147 + 1.306853 = 1.75 = ((1-4)² + (1+4)·1)/(2·1·4) = (9+5)/8
    assert F.sym_kl_gauss(0, 1, 1, 4) == pytest.approx(14 / 8)


def test_w2_normalised_hand_computed():
    # W2² = (0-1)² + (1-2)² = 2; normalised by (1+4)/2 = 2.5 → 0.8
    assert F.w2_sq_normalised(0, 1, 1, 4) == pytest.approx(0.8)
    assert F.w2_sq_normalised(5, 9, 5, 9) == pytest.approx(0.0)


def test_channel_drift_means_over_channels_and_skips_dead():
    mu1, var1 = np.array([0.0, 0.0, 7.0]), np.array([1.0, 4.0, 0.0])  # channel 3 is dead (var 0)
    mu2, var2 = np.array([1.0, 0.0, 7.0]), np.array([1.0, 4.0, 0.0])
    kl, w2, n = F.channel_drift(mu1, var1, mu2, var2)
    assert n == 2
    assert kl == pytest.approx((1.0 + 0.0) / 2)  # channel 1: d²/σ² = 1; channel 2: 0
    assert w2 == pytest.approx((1.0 + 0.0) / 2)


def test_channel_drift_leaves_out_channels_constant_over_the_samples():
    """Regression: BERT's token-type embedding (one token type: every sample the same vector) has
    channel variances of ~1e-17 from float32 rounding, all alike, so none fell below the median
    floor, and the learnt value's move read as a symmetric KL of 2e11. A channel whose std is
    below 1e-5 of its |mean| holds one value; a real one beside it is still measured."""
    x = np.full((128, 3), [0.0138, 0.0038, -0.0076], dtype=np.float32)
    x2 = x + np.float32(0.001)
    mu1, var1 = x.mean(0, dtype=np.float64), x.astype(np.float64).var(0) + 4e-17
    mu2, var2 = x2.mean(0, dtype=np.float64), x2.astype(np.float64).var(0) + 5e-17
    kl, w2, n = F.channel_drift(mu1, var1, mu2, var2)
    assert n == 0 and np.isnan(kl) and np.isnan(w2)
    kl_r, _, n_r = F.channel_drift_rows(mu1[None], var1[None], mu2[None], var2[None])
    assert n_r[0] == 0 and np.isnan(kl_r[0])
    kl, _, n = F.channel_drift(np.r_[mu1, 0.0], np.r_[var1, 1.0], np.r_[mu2, 1.0], np.r_[var2, 1.0])
    assert n == 1 and kl == pytest.approx(1.0)  # the real channel: d²/σ² = 1
    assert F.channel_drift(np.array([1.0]), np.array([1e-9]), np.array([1.0]), np.array([1e-9]))[2] == 1  # std 3e-5·|μ|


@pytest.mark.parametrize("q,c,v,want", [
    (0.5, 0.0, 1.0, 0.5),              # Δ = q for zero-mean input
    (0.5, 1.0, 1.0, 1 / (2 / 0.5 - 1)),  # v/((c²+v)/q − c²) = 1/(4−1) = 1/3
    (0.8, 2.0, 1.0, 1 / (5 / 0.8 - 4)),  # 1/(6.25−4) = 0.4444
])  # fmt: skip
def test_variance_shift_closed_form(q, c, v, want):
    assert F.variance_shift_closed_form(q, c, v) == pytest.approx(want)


def test_dropout_moments_roundtrip_and_monte_carlo():
    c, v, q = 1.5, 0.7, 0.6
    mean, var = F.dropout_train_moments(c, v, q)
    assert mean == pytest.approx(1.5) and var == pytest.approx((1.5**2 + 0.7) / 0.6 - 1.5**2)
    back_c, back_v = F.input_moments_from_dropout_output(mean, var, q)
    assert back_c == pytest.approx(c) and back_v == pytest.approx(v)
    rng = np.random.default_rng(0)
    x = c + np.sqrt(v) * rng.standard_normal(2_000_000)
    y = x * (rng.random(x.size) < q) / q
    assert y.var() == pytest.approx(var, rel=1e-2)


def test_uout_and_shift_factor():
    assert F.uout_variance_shift(0.5) == pytest.approx(3 / 3.25)
    assert F.shift_factor(0.5) == pytest.approx(2.0) and F.shift_factor(2.0) == pytest.approx(2.0)


def test_update_ratio_and_effective_lr():
    np.testing.assert_allclose(F.update_ratio([1e-3, 2.0], [1.0, 4.0]), [1e-3, 0.5])
    assert np.isnan(F.update_ratio(1.0, 0.0))
    np.testing.assert_allclose(F.effective_lr([0.1, 0.1], [1.0, 2.0]), [0.1, 0.025])


def test_dormant_scores():
    s = F.dormant_scores([0.0, 1.0, 2.0, 0.04])  # mean 0.76
    np.testing.assert_allclose(s, np.array([0.0, 1.0, 2.0, 0.04]) / 0.76)
    assert (F.dormant_scores([0.0, 0.0]) == 0).all()


def test_population_moments_precise_bn():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])  # 3 samples, 2 channels
    mean, var = F.population_moments(3, x.sum(0), (x * x).sum(0))
    np.testing.assert_allclose(mean, [3.0, 6.0])
    np.testing.assert_allclose(var, [8 / 3, 32 / 3])  # E[x²]−E[x]² (population)


def test_stale_stats_units():
    dmu, ratio = F.stale_stats([0.2, 0.0], [1.0, 2.0], [0.0, 0.0], [4.0, 1.0], eps=0.0)
    np.testing.assert_allclose(dmu, [0.1, 0.0])  # |0.2−0|/√4
    np.testing.assert_allclose(ratio, [0.25, 2.0])


def test_geometric_rate():
    assert F.geometric_rate([1.0, 0.1, 0.01, 0.001]) == pytest.approx(0.1)
    assert math.isnan(F.geometric_rate([1.0]))


def test_bn_running_ema_equals_batchnorm_running_statistics():
    """The rebuild of BN's running statistics from the batch statistics it saw equals BatchNorm's own."""
    import torch

    torch.manual_seed(0)
    for momentum in (0.1, 0.3, None):
        bn = torch.nn.BatchNorm2d(3, momentum=momentum)
        means, vars_, counts = [], [], []
        for k in range(12):
            x = torch.randn(8, 3, 4, 5) * (1 + k / 5) + k / 3
            bn(x)
            means.append(x.double().mean((0, 2, 3)).numpy())
            vars_.append(x.double().var((0, 2, 3), unbiased=False).numpy())
            counts.append(8 * 4 * 5)
        rm, rv, sd_m, sd_v = F.bn_running_ema(means, vars_, counts, momentum)
        np.testing.assert_allclose(rm, bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rv, bn.running_var.double().numpy(), rtol=1e-5, atol=1e-6)
        assert not sd_m.any() and not sd_v.any()  # every step seen: exact


def _bn_history(steps: int, channels: int, momentum, seed: int = 0):
    """A BatchNorm fed ``steps`` batches whose statistics drift (a smooth trend plus batch noise):
    the batch means, biased variances and counts it saw, and its final running statistics."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels, momentum=momentum)
    shift = torch.randn(channels, generator=g)
    means, vars_ = [], []
    for k in range(steps):
        trend = 0.5 * shift * np.sin(k / 9.0) + k / 40.0
        x = torch.randn(16, channels, 4, 4, generator=g) * (1.0 + 0.3 * np.cos(k / 7.0)) + trend.view(1, -1, 1, 1)
        bn(x)
        means.append(x.double().mean((0, 2, 3)).numpy())
        vars_.append(x.double().var((0, 2, 3), unbiased=False).numpy())
    counts = np.full(steps, 16 * 4 * 4)
    return np.array(means), np.array(vars_), counts, bn.running_mean.double().numpy(), bn.running_var.double().numpy()


def test_bn_running_ema_interpolates_between_sampled_steps_exactly_on_linear_statistics():
    """Batch statistics linear in the step: the interpolated rebuild from every 3rd or 7th row
    equals the every-step one, and the tail after the last row errs by exactly the drift bound."""
    T, t = 40, np.arange(40)
    means = 0.3 + 0.02 * t[:, None] * np.array([1.0, -2.0, 0.5])
    vars_ = 1.0 + 0.01 * t[:, None] * np.array([1.0, 3.0, 0.2])
    counts = np.full(T, 100)
    full = F.bn_running_ema(means, vars_, counts, 0.1)
    for k in (3, 7):
        sel = (t % k == 0) | (t == T - 1)
        r = F.bn_running_ema(means[sel], vars_[sel], counts[sel], 0.1, steps=t[sel], until=T)
        np.testing.assert_allclose(r[0], full[0], atol=1e-12)
        np.testing.assert_allclose(r[1], full[1], atol=1e-12)
        assert r[2].max() < 1e-12 and r[3].max() < 1e-12  # residuals of a line are 0
    sel = t % 10 == 0  # last row at step 30: nine steps held flat
    r = F.bn_running_ema(means[sel], vars_[sel], counts[sel], 0.1, steps=t[sel], until=T)
    np.testing.assert_allclose(np.abs(r[0] - full[0]), r[2], rtol=1e-9)  # the drift bound is the error, exactly
    assert (np.abs(r[0] - full[0]) > 0.01).all()


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_bn_running_ema_sparse_rebuild_error_within_its_bound(momentum):
    """Drifting, noisy batch statistics from a real BatchNorm: rebuilt from every 3rd row, the
    running statistics differ from BN's own by less than three times the rebuild's bound on 95 %
    of the channels (and the bound is not vacuous: well under the 0.1σ the check judges at)."""
    means, vars_, counts, rm, rv = _bn_history(60, 64, momentum)
    t = np.arange(60)
    sel = t % 3 == 0
    em, ev, sd_m, sd_v = F.bn_running_ema(means[sel], vars_[sel], counts[sel], momentum, steps=t[sel], until=60)
    assert (sd_m > 0).all() and (sd_v > 0).all()
    assert (np.abs(em - rm) <= 3 * sd_m).mean() >= 0.95
    assert (np.abs(ev - rv) <= 3 * sd_v).mean() >= 0.95
    assert np.median(sd_m / np.sqrt(ev)) < 0.1
    exact = F.bn_running_ema(means, vars_, counts, momentum)
    np.testing.assert_allclose(exact[0], rm, atol=1e-5)


def test_bn_running_ema_too_few_rows_has_no_bound():
    means, vars_, counts, *_ = _bn_history(10, 4, 0.1)
    r = F.bn_running_ema(means[[0, 5]], vars_[[0, 5]], counts[[0, 5]], 0.1, steps=[0, 5], until=10)
    assert np.isinf(r[2]).all() and np.isinf(r[3]).all()
    with pytest.raises(ValueError, match="increasing"):
        F.bn_running_ema(means[:2], vars_[:2], counts[:2], 0.1, steps=[3, 1])
    with pytest.raises(ValueError, match="until"):
        F.bn_running_ema(means[:2], vars_[:2], counts[:2], 0.1, steps=[0, 5], until=3)


def test_stale_lag_rebuild_declines_rows_that_repeat_a_step():
    """Two BN-input rows for one step (nothing the collector writes today): the lag test says it
    cannot use the rows instead of failing the whole check on the rebuild's ValueError."""
    import types

    import pandas as pd

    from normscope.analyze.checks import stale_running_stats as S

    rows = pd.DataFrame({"layer": ["bn"] * 3, "output": ["input"] * 3, "call": [0] * 3, "step": [0, 1, 1],
                         "ch_mean": [np.zeros(2)] * 3, "ch_var": [np.ones(2)] * 3, "forwards": [1] * 3,
                         "count": [64] * 3})  # fmt: skip
    t = {"mean_sigma": 0.1, "var_lo": 0.8, "var_hi": 1.25, "channel_frac": 0.5}
    ctx = types.SimpleNamespace(train=rows)
    assert S._lag_only(ctx, "bn", {"momentum": 0.1}, np.zeros(2), np.ones(2), 1e-5, t, 2) is None
    ok = rows.iloc[:2]
    lag = S._lag_only(types.SimpleNamespace(train=ok), "bn", {"momentum": 0.1}, np.zeros(2), np.ones(2), 1e-5, t, 2)
    assert lag is not None and lag["rebuild"] == "every step recorded"


@pytest.mark.parametrize("k,momentum,micro", [(2, 0.1, 16), (4, 0.1, 8), (2, 0.9, 16), (3, None, 8)])
def test_stale_rebuild_from_merged_micro_batches_is_within_its_bound(k, momentum, micro):
    """Gradient accumulation: a real BatchNorm1d updated K times a step, one micro-batch each; the
    rebuild from the step's merged moments (what the collector records) lands within three of
    bn_merge_error's sds of the true running statistics on at least 95 % of 256 channels, and the
    sds are calibrated: the realised RMS error is 0.5-2× the predicted sd."""
    import torch

    torch.manual_seed(0)
    ch, steps = 256, 60
    bn = torch.nn.BatchNorm1d(ch, momentum=momentum)
    means, vars_, counts = [], [], []
    drift = torch.linspace(-1, 1, ch)
    for s in range(steps):
        xs = [torch.randn(micro, ch) * (1 + 0.3 * torch.rand(ch)) + drift * s / steps for _ in range(k)]
        for x in xs:
            bn(x)
        x = torch.cat(xs).double()
        means.append(x.mean(0).numpy())
        vars_.append(x.var(0, unbiased=False).numpy())
        counts.append(micro)
    st = (np.arange(steps)[:, None] * k + np.arange(k)).reshape(-1)
    rep = [np.repeat(np.array(a), k, axis=0) for a in (means, vars_, counts)]
    ema_m, ema_v, _, _ = F.bn_running_ema(*rep, momentum, st, until=steps * k)
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    sd = np.sqrt(rv)
    err_m, err_v = np.abs(ema_m - rm) / sd, np.abs(ema_v / rv - 1)
    bm, bv = F.bn_merge_error(momentum, k, micro)
    assert (err_m <= 3 * bm + 1e-5).mean() >= 0.95 and (err_v <= 3 * bv).mean() >= 0.95
    if bm > 0:
        assert 0.5 <= np.sqrt(np.mean(err_m**2)) / bm <= 2
    assert 0.5 <= np.sqrt(np.mean(err_v**2)) / bv <= 2
