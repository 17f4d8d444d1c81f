"""The per-check harness: every threshold tested just above and just below, the severity ladder, the skip reason.

Runs are synthetic (tests/analyze/synthetic.py): the statistics are set to the value each check
compares, so a flipped comparison or an off-by-one in a check's decision fails a test here.
"""

import numpy as np
import pytest
from synthetic import SyntheticRun

from normscope.analyze import analyze_full

LIN = {"type": "Linear", "params": 10}


def _findings(run, check, **config):
    a = analyze_full(run, checks=[check], config={check: config} if config else None)
    return a, [(f.severity, f.layer) for f in a.findings if f.check == check]


def _skip(a, check):
    return {s.check: s.reason for s in a.skipped}.get(check)


# --- dead-units: warn 0.10, error 0.40 (fraction of units never active over the window) ------------------
@pytest.mark.parametrize("dead,want", [(0, []), (9, ["info"]), (11, ["warning"]), (39, ["warning"]), (41, ["error"])])
def test_dead_units_ladder(tmp_path, dead, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN, "1": {"type": "ReLU", "family": "relu"}})
    for step in range(10):
        act = np.full(100, 64)
        act[:dead] = 0
        r.stat(step, "1", channels=100, active=act, ch_mean=np.ones(100))
    a, got = _findings(r.done(), "dead-units")
    assert [s for s, _ in got] == want


def test_dead_units_skips(tmp_path):
    r = SyntheticRun(tmp_path / "a", {"0": LIN})
    r.stat(0, "0")
    a, _ = _findings(r.done(), "dead-units")
    assert _skip(a, "dead-units").startswith("no ReLU-family layer")
    r = SyntheticRun(tmp_path / "b", {"1": {"type": "ReLU", "family": "relu"}})
    for step in range(3):
        r.stat(step, "1", samples=8, channels=10, active=np.zeros(10))
    a, _ = _findings(r.done(), "dead-units")
    assert "too few to call a unit dead" in _skip(a, "dead-units")


# --- saturation: warn 0.2, error 0.5 (saturated fraction over the final window) ---------------------------
@pytest.mark.parametrize("frac,want", [(0.19, []), (0.21, ["warning"]), (0.49, ["warning"]), (0.51, ["error"])])
def test_saturation_ladder(tmp_path, frac, want):
    r = SyntheticRun(tmp_path / "r", {"1": {"type": "Sigmoid", "sat": "sigmoid", "family": "sigmoid"}})
    for step in range(10):
        r.stat(step, "1", frac_sat=frac)
    a, got = _findings(r.done(), "saturation")
    assert [s for s, _ in got] == want


def test_saturation_skip(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = _findings(r.done(), "saturation")
    assert _skip(a, "saturation").startswith("no saturating activation")


# --- small-batch-bn: warn below 16, error below 4 samples per replica ------------------------------------
@pytest.mark.parametrize("batch,want", [(16, []), (15, ["warning"]), (4, ["warning"]), (3, ["error"])])
def test_small_batch_bn_ladder(tmp_path, batch, want):
    r = SyntheticRun(tmp_path / "r", {"1": {"type": "BatchNorm2d", "role": "norm"}})
    for step in range(4):
        r.stat(step, "1", output="input", samples=batch)
        r.stat(step, "1", samples=batch)
    a, got = _findings(r.done(), "small-batch-bn")
    assert [s for s, _ in got] == want


# --- syncbn-recommended: under torch.distributed, warn below 16 samples per rank -------------------------
@pytest.mark.parametrize("batch,world,want", [(16, 2, []), (15, 2, ["warning"]), (8, 1, None)])
def test_syncbn_threshold_and_skip(tmp_path, batch, world, want):
    r = SyntheticRun(tmp_path / "r", {"1": {"type": "BatchNorm2d", "role": "norm"}})
    for step in range(3):
        r.stat(step, "1", output="input", samples=batch)
    a, got = _findings(r.done(distributed={"world_size": world}), "syncbn-recommended")
    if want is None:
        assert "torch.distributed" in _skip(a, "syncbn-recommended")
    else:
        assert [s for s, _ in got] == want


# --- vanishing-gradients: relative weight gradient, first/last block below 1e-3 (error below 1e-6) ----------
@pytest.mark.parametrize(
    "ratio,want", [(1.1e-3, []), (0.9e-3, ["warning"]), (1.1e-6, ["warning"]), (0.9e-6, ["error"])]
)
def test_vanishing_ladder(tmp_path, ratio, want):
    mods = {str(i): LIN for i in range(4)}
    r = SyntheticRun(tmp_path / "r", mods)
    for step in range(4):
        for i in range(4):
            r.param(step, f"{i}.weight", norm=2.0, grad_norm=1e-2 * (ratio if i == 0 else 1.0), update_norm=1e-3)
    a, got = _findings(r.done(), "vanishing-gradients")
    assert [s for s, _ in got] == want


def test_vanishing_skip(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.param(0, "0.weight", 1.0, 0.1, 0.01)
    a, _ = _findings(r.done(), "vanishing-gradients")
    assert _skip(a, "vanishing-gradients").startswith("fewer than two conv/linear weights")


# --- exploding-gradients: output-gradient norm, first/last above 1e3 (error above 1e6) ---------------------
@pytest.mark.parametrize("ratio,want", [(0.9e3, []), (1.1e3, ["warning"]), (0.9e6, ["warning"]), (1.1e6, ["error"])])
def test_exploding_ladder(tmp_path, ratio, want):
    r = SyntheticRun(tmp_path / "r", {str(i): LIN for i in range(4)})
    for step in range(4):
        for i in range(4):
            r.grad(step, str(i), norm=1e-2 * (ratio if i == 0 else 1.0))
    a, got = _findings(r.done(), "exploding-gradients")
    assert [s for s, _ in got] == want


def test_exploding_skip(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.grad(0, "0", 1.0)
    a, _ = _findings(r.done(), "exploding-gradients")
    assert _skip(a, "exploding-gradients").startswith("fewer than two parametrised layers")


# --- update-ratio: around the optimizer's centre (SGD 1e-3, Adam 1e-2), warn 2 decades, info 1 -------------
@pytest.mark.parametrize("ratio,want", [
    (0.9e-5, ["warning"]), (1.1e-5, ["info"]), (0.9e-4, ["info"]), (1.1e-4, []), (0.9e-2, []), (1.1e-2, ["info"]),
    (0.9e-1, ["info"]), (1.1e-1, ["warning"]),
])  # fmt: skip
def test_update_ratio_ladder_sgd(tmp_path, ratio, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * ratio)
    a, got = _findings(r.done(optimizer={"type": "SGD", "momentum": 0.0}), "update-ratio")
    assert [s for s, _ in got] == want
    if want:
        f = [f for f in a.findings if f.check == "update-ratio"][0]
        assert "SGD" in f.message and f.evidence["healthy_center"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "momentum,ratio,want", [(0.9, 1.1e-1, ["info"]), (0.9, 0.9e-1, []), (0.0, 1.1e-1, ["warning"])]
)
def test_update_ratio_momentum_moves_the_centre(tmp_path, momentum, ratio, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * ratio)
    a, got = _findings(r.done(optimizer={"type": "SGD", "momentum": momentum}), "update-ratio")
    assert [s for s, _ in got] == want


@pytest.mark.parametrize("lr,ratio,want", [
    (1.1e-3 * 2 / 16, 1e-5, []),  # lr / RMS(w) just above 1e-3: noisy gradients, not a low lr
    (0.9e-3 * 2 / 16, 1e-5, ["info"]),
    (0.9e-4 * 2 / 16, 1e-5, ["warning"]),  # lr itself two decades too low for the weights' size
    (1e-3, 0.09, []), (1e-3, 0.11, ["info"]), (1e-3, 0.9, ["info"]),
    (1e-3, 1.1, ["warning"]),  # the high side reads the actual ratio (centre 1e-2 → warn above 1)
])  # fmt: skip
def test_update_ratio_adam_band(tmp_path, lr, ratio, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * ratio, numel=256, lr=lr)  # RMS(w)=2/16
    a, got = _findings(r.done(optimizer={"type": "AdamW"}), "update-ratio")
    assert [s for s, _ in got] == want


def _scheduled(tmp_path, frac, at_peak, opt="SGD", peak=0.1, numel=256, tail_lrs=None):
    """8 steps: lr ``peak`` for steps 0-3, then ``peak · frac`` (or ``tail_lrs``) for the window 4-7,
    each step's ratio ``at_peak`` scaled by its lr, as SGD and Adam scale it."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    lrs = [peak] * 4 + (tail_lrs or [peak * frac] * 4)
    for step, lr in enumerate(lrs):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * at_peak * lr / peak, numel=numel, lr=lr)
    meta = {"type": opt, "momentum": 0.0} if opt == "SGD" else {"type": opt}
    a, got = _findings(r.done(optimizer=meta), "update-ratio")
    return a, got, [f for f in a.findings if f.check == "update-ratio"]


@pytest.mark.parametrize("at_peak,want", [(1e-3, []), (1.1e-5, ["info"]), (0.9e-5, ["warning"])])
def test_update_ratio_low_side_is_judged_at_the_peak_lr(tmp_path, at_peak, want):
    """A step decay to ×0.009 (actual ratio 9e-6 at a healthy 1e-3 at the peak, which read as a warning
    before): the low side scales each step to the run's peak lr; the band is the same."""
    a, got, fs = _scheduled(tmp_path, 0.009, at_peak)
    assert [s for s, _ in got] == want
    if want:
        ev = fs[0].evidence["params"]["0.weight"]
        assert ev["ratio_at_peak_lr"] == pytest.approx(at_peak) and ev["median_ratio"] == pytest.approx(at_peak * 0.009)
        assert ev["lr_peak"] == pytest.approx(0.1) and ev["lr_fraction"] == pytest.approx(0.009)
        assert "peak learning rate 0.1" in fs[0].message and "×0.009" in fs[0].message


@pytest.mark.parametrize("peak,want", [(1e-3, []), (0.9e-4 * 2 / 16, ["warning"])])
def test_update_ratio_adam_potential_uses_the_peak_lr(tmp_path, peak, want):
    # RMS(w) = 2/16: lr / RMS(w) is 8e-3 at the peak lr 1e-3, 8e-5 (a warning before) at the annealed 1e-5;
    # a peak lr itself two decades too low still warns, judged at that peak
    _, got, fs = _scheduled(tmp_path, 0.01, 1e-3, opt="AdamW", peak=peak)
    assert [s for s, _ in got] == want
    if want:
        assert fs[0].evidence["params"]["0.weight"]["lr_over_rms_w"] == pytest.approx(peak * 16 / 2)


def test_update_ratio_annealed_to_zero_and_high_side(tmp_path):
    # cosine's last step at lr 0 is left out of the scaling (no 0/0): the other three steps still judge the
    # ratio at the peak, healthy at 1e-3 and a warning at 0.9e-5 (a NaN from 0/0 would silence it)
    tail = [0.05, 0.02, 0.005, 0.0]
    _, got, _ = _scheduled(tmp_path, 0, 1e-3, tail_lrs=tail)
    assert got == []
    _, got, fs = _scheduled(tmp_path / "low", 0, 0.9e-5, tail_lrs=tail)
    assert [s for s, _ in got] == ["warning"]
    assert fs[0].evidence["params"]["0.weight"]["ratio_at_peak_lr"] == pytest.approx(0.9e-5)
    # the high side reads the actual ratio: 0.2 at lr ×0.5 is still two decades above SGD's 1e-3
    _, got, fs = _scheduled(tmp_path / "hi", 0.5, 0.4)
    assert [s for s, _ in got] == ["warning"] and "above" in fs[0].message


@pytest.mark.parametrize("frac,want", [(1.1e-3, []), (0.9e-3, ["warning"])])
def test_update_ratio_lr_collapse(tmp_path, frac, want):
    """A schedule that took the lr down by more than 1,000× over the window (an epoch schedule stepped
    per batch) is a warning even though the ratio scaled to the peak is healthy."""
    _, got, fs = _scheduled(tmp_path, frac, 1e-3)
    assert [s for s, _ in got] == want
    if want:
        assert "stopped training" in fs[0].message and "scheduler" in fs[0].recommendation
        assert fs[0].evidence["params"]["0.weight"]["lr_fraction"] == pytest.approx(frac)


def test_update_ratio_near_zero_init_is_judged_by_absolute_updates(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN, "1": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2e-3)
        r.param(step, "1.weight", norm=1e-5, grad_norm=0.1, update_norm=1e-3)  # a layer scale starting at 1e-6
    a, got = _findings(r.done(optimizer={"type": "SGD"}, param_init_rms={"0.weight": 0.1, "1.weight": 1e-6}),
                       "update-ratio")  # fmt: skip
    assert got == []  # its ratio (100) would be a warning


# --- covariate-shift (info): median late symmetric KL between steps 10 apart above 0.5 ---------------------
@pytest.mark.parametrize("shift,want", [(0.068, []), (0.073, ["info"])])
def test_covariate_shift_threshold(tmp_path, shift, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(40):  # mean moves by `shift` per step, var 1: KL over 10 steps = (10·shift)²
        r.stat(step, "0", ch_mean=np.full(4, shift * step), ch_var=np.ones(4))
    a, got = _findings(r.done(), "covariate-shift")
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
    a, got = _findings(run, "covariate-shift")
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
    a, got = _findings(r.done(), "covariate-shift")
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
    a, got = _findings(r.done(), "covariate-shift")
    assert got == [("info", "0")]
    ev = a.findings[0].evidence
    assert ev["lag"] == 60 and ev["noise_gap"] == 20
    assert ev["layers"][0]["late_sym_kl"] == pytest.approx((0.02 * 60) ** 2, rel=1e-4)
    assert "60 apart (three gaps" in a.findings[0].message
    r = SyntheticRun(tmp_path / "s", {"0": LIN})
    for step in (0, 20, 39):
        r.stat(step, "0", ch_mean=np.full(4, 0.02 * step), ch_var=np.ones(4))
    a, got = _findings(r.done(), "covariate-shift")
    assert got == [] and "span 39 step(s), fewer than the 57" in _skip(a, "covariate-shift")


def test_covariate_shift_constant_layer_is_quietly_not_measured(tmp_path):
    """A layer whose output is one value in every sample (its channel std ~1e-7 of the mean) and
    whose value moves as it learns: no drift measured, no note, no numpy warning."""
    import warnings

    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(40):
        r.stat(step, "0", channels=8, ch_mean=np.full(8, 0.01 + 1e-3 * step), ch_var=np.full(8, 5e-17))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, got = _findings(r.done(), "covariate-shift")
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
    a, got = _findings(r.done(), "overfitting")
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
    a, got = _findings(r.done(), "underfitting")
    assert [s for s, _ in got] == want


def test_fitting_skip_without_eval_loss(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    r.scalar(0, 1.0)
    a, _ = _findings(r.done(), "overfitting")
    assert _skip(a, "overfitting").startswith("no eval loss logged")


# --- weight-sparsity (info): ≥ 25 % of a weight below 1e-3 × max|w| -----------------------------------------
@pytest.mark.parametrize("frac,want", [(0.24, []), (0.26, ["info"])])
def test_weight_sparsity_threshold(tmp_path, frac, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    probe = {"mode": "recipe", "weights": {"0.weight": {"layer": "0", "numel": 100, "max_abs": 1.0,
                                                        "frac_below": {"1e-03": frac}}}}  # fmt: skip
    a, got = _findings(r.done(probe=probe), "weight-sparsity")
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
    a, got = _findings(r.done(probe=probe), "unnormalized-inputs")
    assert [s for s, _ in got] == want


def test_unnormalized_inputs_skip_without_probe(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = _findings(r.done(), "unnormalized-inputs")
    assert "only normscope.probe measures" in _skip(a, "unnormalized-inputs")


# --- loss-scaling: skipped fraction over the second half warns at 5 %, errors at 50 %; scale below 1 warns ---
def _amp_run(tmp_path, skipped: set, scale_last: float = 1024.0, steps: int = 100):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    total = 0
    for step in range(steps):
        total += step in skipped
        r.scalar(step, 2.0**20 if step == 0 else scale_last if step == steps - 1 else 1024.0, "amp", "loss_scale")
        r.scalar(step, float(step in skipped), "amp", "skipped")
        r.scalar(step, float(total), "amp", "skipped_total")
    return r.done(steps_seen=steps, amp={"type": "GradScaler", "skipped_steps": total})


@pytest.mark.parametrize("k,want", [(0, ["info"]), (2, ["info"]), (3, ["warning"]), (24, ["warning"]), (26, ["error"])])
def test_loss_scaling_skip_ladder(tmp_path, k, want):
    # 4 skips while the scaler calibrates (steps 0-3, outside the window), then k in the window's 50 steps
    a, got = _findings(_amp_run(tmp_path, {0, 1, 2, 3} | set(range(50, 50 + k))), "loss-scaling")
    assert [s for s, _ in got] == want
    f = [f for f in a.findings if f.check == "loss-scaling"][0]
    assert f.evidence["window_skip_fraction"] == pytest.approx(k / 50) and f.evidence["skipped_steps"] == 4 + k
    assert f.evidence["window_steps"] == [50, 99]


@pytest.mark.parametrize("last,want", [(1.0, []), (0.5, ["warning"])])
def test_loss_scaling_scale_below_one_warns(tmp_path, last, want):
    a, got = _findings(_amp_run(tmp_path, set(), scale_last=last), "loss-scaling")
    assert [s for s, _ in got] == want
    if want:
        assert "fell to 0.5" in a.findings[0].message and a.findings[0].evidence["loss_scale_last"] == 0.5


def test_loss_scaling_skips_without_a_scaler(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.scalar(0, 1.0)
    a, got = _findings(r.done(), "loss-scaling")
    assert got == [] and "no GradScaler" in _skip(a, "loss-scaling")


# --- bn-momentum: warn at a BatchNorm momentum ≥ 0.5 (PyTorch's convention: the newest batch's weight) ---
@pytest.mark.parametrize("momentum,want", [(0.1, []), (0.49, []), (0.5, ["warning"]), (0.997, ["warning"]),
                                           (1.0, ["warning"]), (None, [])])  # fmt: skip
def test_bn_momentum_threshold(tmp_path, momentum, want):
    bn = {"type": "BatchNorm2d", "role": "norm", "bn": True, "momentum": momentum, "track_running_stats": True}
    r = SyntheticRun(tmp_path / "r", {"1": bn, "2": dict(bn, track_running_stats=False, momentum=0.9)})
    r.stat(0, "1")
    a, got = _findings(r.done(), "bn-momentum")
    assert [s for s, _ in got] == want  # a BN without running statistics has no momentum to get wrong
    if want:
        (f,) = [f for f in a.findings if f.check == "bn-momentum"]
        assert [x["layer"] for x in f.evidence["layers"]] == ["1"] and f.evidence[
            "pytorch_equivalent_of_tf_decay"
        ] == pytest.approx(1 - momentum)
        assert f.evidence["effective_batches"] == pytest.approx((2 - momentum) / momentum)


def test_bn_momentum_skips(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = _findings(r.done(), "bn-momentum")
    assert _skip(a, "bn-momentum").startswith("no BatchNorm layer")
    r = SyntheticRun(tmp_path / "o", {"1": {"type": "BatchNorm2d", "role": "norm"}})  # a run from before the record
    r.stat(0, "1")
    a, _ = _findings(r.done(), "bn-momentum")
    assert _skip(a, "bn-momentum").startswith("BatchNorm momentum not recorded")


# --- norm-scale-init: γ RMS at the start below 0.1 (not near zero) on ≥ half the norms; error at collapse 1e-3 --
def _norm_init_run(tmp_path, gammas, out_rms=None):
    norm = {"type": "BatchNorm2d", "role": "norm"}
    r = SyntheticRun(tmp_path / "r", {str(i): norm for i in range(len(gammas))})
    for i, rms in enumerate(out_rms or [1.0] * len(gammas)):
        r.stat(0, str(i), mean=0.0, std=rms)
    return r.done(param_init_rms={f"{i}.weight": g for i, g in enumerate(gammas)} | {"0.bias": 0.0})


@pytest.mark.parametrize("gammas,want", [
    ([0.099] * 4, ["warning"]), ([0.1] * 4, []), ([1.0] * 4, []),
    ([5e-5] * 4, []),  # a zero-init γ (the last norm of a residual branch, Gemma's 1 + w): meant
    ([0.02, 0.02, 1.0, 1.0], ["warning"]), ([0.02, 1.0, 1.0], []),  # at least half of the norm layers
])  # fmt: skip
def test_norm_scale_init_threshold(tmp_path, gammas, want):
    a, got = _findings(_norm_init_run(tmp_path, gammas), "norm-scale-init")
    assert [s for s, _ in got] == want


@pytest.mark.parametrize("last,want", [(1.1e-3, "warning"), (0.9e-3, "error")])
def test_norm_scale_init_collapse(tmp_path, last, want):
    a, got = _findings(_norm_init_run(tmp_path, [0.02] * 3, out_rms=[1.0, 0.1, last]), "norm-scale-init")
    (f,) = [f for f in a.findings if f.check == "norm-scale-init"]
    assert f.severity == want and f.evidence["output_rms_last_over_first"] == pytest.approx(last, rel=1e-6)
    assert [x["layer"] for x in f.evidence["layers"]] == ["0", "1", "2"] and f.evidence[
        "init_rms_median"
    ] == pytest.approx(0.02)


def test_norm_scale_init_skips(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = _findings(r.done(param_init_rms={"0.weight": 0.02}), "norm-scale-init")
    assert _skip(a, "norm-scale-init").startswith("no normalisation layer")


# --- update-ratio: parameters without any gradient — info below 10 % of the trainable elements, warning from it --
@pytest.mark.parametrize("unused,want", [(32, "info"), (110, "info"), (112, "warning")])
def test_update_ratio_parameters_without_gradient(tmp_path, unused, want):
    """Regression: DINOv2's mask_token (no gradient without bool_masked_pos) warned 'two decades below
    … frozen by accident'. 1000 + unused trainable elements; 112/1112 ≥ 10 %."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN, "1": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * 1e-2, numel=1000, lr=1e-3)
        r.param(step, "1.weight", norm=2.0, grad_norm=float("nan"), update_norm=0.0, numel=unused, lr=1e-3)
    a, got = _findings(r.done(optimizer={"type": "AdamW"}), "update-ratio")
    (f,) = [f for f in a.findings if f.check == "update-ratio"]
    assert f.severity == want and f.layer == "1" and f.evidence["no_gradient"] == ["1.weight"]
    assert f.evidence["share_of_trainable"] == pytest.approx(unused / (1000 + unused))
    assert "received no gradient at any recorded step" in f.message


def test_update_ratio_without_any_recorded_gradient_still_judges_the_ratio(tmp_path):
    """A run whose gradient norms were not recorded at all: no 'unused' verdict, the ratio is judged."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=float("nan"), update_norm=0.0)
    a, got = _findings(r.done(optimizer={"type": "SGD", "momentum": 0.0}), "update-ratio")
    (f,) = [f for f in a.findings if f.check == "update-ratio"]
    assert f.severity == "warning" and f.evidence["frozen"] == ["0.weight"]
