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
        rm, rv = F.bn_running_ema(means, vars_, counts, momentum)
        np.testing.assert_allclose(rm, bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rv, bn.running_var.double().numpy(), rtol=1e-5, atol=1e-6)
