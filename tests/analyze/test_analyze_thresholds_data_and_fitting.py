"""Thresholds of the input, drift and fitting checks, each just above and just below:
covariate-shift, overfitting, underfitting, weight-sparsity, unnormalized-inputs.

The severity ladder and the skip reason too. Runs are synthetic (tests/analyze/synthetic.py): the
statistics are set to the value each check compares, so a flipped comparison or an off-by-one in a
check's decision fails a test here.
"""

import numpy as np
import pytest
from synthetic import LIN, SyntheticRun, judge, skip_reason


# --- covariate-shift (info): median late symmetric KL between steps 10 apart above 0.5 ---------------------
@pytest.mark.parametrize("shift,want", [(0.068, []), (0.073, ["info"])])
def test_covariate_shift_threshold(tmp_path, shift, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(40):  # mean moves by `shift` per step, var 1: KL over 10 steps = (10·shift)²
        r.stat(step, "0", ch_mean=np.full(4, shift * step), ch_var=np.ones(4))
    a, got = judge(r.done(), "covariate-shift")
    assert [s for s, _ in got] == want


def _batch_moments(rng, n, channels, shift=0.0, sparse=False):
    """Per-channel moments of one batch of n samples: N(shift, 1), or ReLU(N(−1.5, 1)) (a sparse
    unit, mostly zero in a batch) when ``sparse``."""
    x = rng.standard_normal((n, channels)) + shift
    if sparse:
        x = np.maximum(x - 1.5, 0.0) + 1e-3 * rng.standard_normal((n, channels))
    return x.mean(0), x.var(0)


@pytest.mark.parametrize("n,sparse", [(4, False), (8, False), (32, True)])
def test_covariate_shift_batch_noise_alone_is_not_drift(tmp_path, n, sparse):
    """Regression: a stationary layer (fixed weights, i.i.d. batches) at batch 4 or 8, or with
    sparse rectified units at batch 32 (MobileNetV2's dropout output), was noted as "keeps drifting"
    with a symmetric KL of 2–40: the sampling noise of two batches' moments, not a shift."""
    from normscope.analyze import covariate_shift

    rng = np.random.default_rng(0)
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(40):
        m, v = _batch_moments(rng, n, 64, sparse=sparse)
        r.stat(step, "0", channels=64, samples=n, ch_mean=m, ch_var=v)
    run = r.done()
    far = covariate_shift(run, lag=10)
    assert np.median(far[far.step >= 30].sym_kl) > 0.5  # what the check used to note
    a, got = judge(run, "covariate-shift")
    assert got == []


@pytest.mark.parametrize("n", [4, 32])
def test_covariate_shift_real_drift_above_the_batch_noise_is_noted(tmp_path, n):
    """The noise reference does not hide a real shift: the mean moving 0.3σ per step (KL ≈ 9 over
    10 steps) is noted at batch 32 and through batch 4's noise, and the evidence names the noise."""
    rng = np.random.default_rng(1)
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(40):
        m, v = _batch_moments(rng, n, 64, shift=0.3 * step)
        r.stat(step, "0", channels=64, samples=n, ch_mean=m, ch_var=v)
    a, got = judge(r.done(), "covariate-shift")
    assert got == [("info", "0")]
    (ly,) = a.findings[0].evidence["layers"]
    assert ly["late_sym_kl"] > 2 * ly["noise_sym_kl"] and ly["late_sym_kl"] - ly["noise_sym_kl"] > 0.5
    assert "closest sampled steps" in a.findings[0].message


def test_covariate_shift_sparse_rows_compare_three_gaps_apart(tmp_path):
    """Rows every 20 steps: no pair is 10 steps apart with a closer pair to measure the noise, so
    the drift is taken 60 steps (three gaps) apart against the 20-step pairs; a run spanning fewer
    than 60 sampled steps is skipped with the reason, not judged on noise."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(0, 400, 20):
        r.stat(step, "0", ch_mean=np.full(4, 0.02 * step), ch_var=np.ones(4))
    a, got = judge(r.done(), "covariate-shift")
    assert got == [("info", "0")]
    ev = a.findings[0].evidence
    assert ev["lag"] == 60 and ev["noise_gap"] == 20
    assert ev["layers"][0]["late_sym_kl"] == pytest.approx((0.02 * 60) ** 2, rel=1e-4)
    assert "60 apart (three gaps" in a.findings[0].message
    r = SyntheticRun(tmp_path / "s", {"0": LIN})
    for step in (0, 20, 39):
        r.stat(step, "0", ch_mean=np.full(4, 0.02 * step), ch_var=np.ones(4))
    a, got = judge(r.done(), "covariate-shift")
    assert got == [] and "span 39 step(s), fewer than the 57" in skip_reason(a, "covariate-shift")


def test_covariate_shift_constant_layer_is_quietly_not_measured(tmp_path):
    """A layer whose output is one value in every sample (its channel std ~1e-7 of the mean) and
    whose value moves as it learns: no drift measured, no note, no numpy warning."""
    import warnings

    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(40):
        r.stat(step, "0", channels=8, ch_mean=np.full(8, 0.01 + 1e-3 * step), ch_var=np.full(8, 5e-17))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, got = judge(r.done(), "covariate-shift")
    assert got == []


# --- overfitting: eval loss rose ≥ 10 % above its minimum while train fell ≥ 5 % ---------------------------
@pytest.mark.parametrize("rise,want", [(0.09, []), (0.11, ["warning"])])
def test_overfitting_threshold(tmp_path, rise, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    for step in range(40):
        r.scalar(step, 2.0 - step * 0.04)
        if step % 4 == 0:
            e = 1.0 if step <= 20 else 1.0 + rise * min(1.0, (step - 20) / 12)
            r.scalar(step, e, phase="eval")
    a, got = judge(r.done(), "overfitting")
    assert [s for s, _ in got] == want


# --- underfitting: both losses ≥ 70 % of the start and flat (< 5 % change over the last half) --------------
@pytest.mark.parametrize("end,want", [(0.69, []), (0.71, ["warning"])])
def test_underfitting_threshold(tmp_path, end, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    for step in range(40):
        v = 1.0 if step < 10 else end  # drops early, then flat
        r.scalar(step, v)
        if step % 4 == 0:
            r.scalar(step, v, phase="eval")
    a, got = judge(r.done(), "underfitting")
    assert [s for s, _ in got] == want


def test_fitting_skip_without_eval_loss(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    r.scalar(0, 1.0)
    a, _ = judge(r.done(), "overfitting")
    assert skip_reason(a, "overfitting").startswith("no eval loss logged")


# --- weight-sparsity (info): ≥ 25 % of a weight below 1e-3 × max|w| -----------------------------------------
@pytest.mark.parametrize("frac,want", [(0.24, []), (0.26, ["info"])])
def test_weight_sparsity_threshold(tmp_path, frac, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    probe = {"mode": "recipe", "weights": {"0.weight": {"layer": "0", "numel": 100, "max_abs": 1.0,
                                                        "frac_below": {"1e-03": frac}}}}  # fmt: skip
    a, got = judge(r.done(probe=probe), "weight-sparsity")
    assert [s for s, _ in got] == want


# --- unnormalized-inputs: std ratio above 100, |mean| above 3·std ----------------------------------------
@pytest.mark.parametrize("std,mean,want", [
    ([1.0, 1.0, 99.0], [0.0, 0.0, 0.0], []), ([1.0, 1.0, 101.0], [0.0, 0.0, 0.0], ["warning"]),
    ([1.0, 1.0, 1.0], [2.9, 0.0, 0.0], []), ([1.0, 1.0, 1.0], [3.1, 0.0, 0.0], ["warning"]),
])  # fmt: skip
def test_unnormalized_inputs_thresholds(tmp_path, std, mean, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    probe = {"mode": "recipe", "inputs": {"axis": -1, "shape": [3], "samples": 512, "mean": mean, "std": std}}
    a, got = judge(r.done(probe=probe), "unnormalized-inputs")
    assert [s for s, _ in got] == want


def test_unnormalized_inputs_skip_without_probe(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = judge(r.done(), "unnormalized-inputs")
    assert "only normscope.probe measures" in skip_reason(a, "unnormalized-inputs")
