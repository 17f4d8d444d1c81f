"""Thresholds of the gradient and update checks, each just above and just below:
vanishing- and exploding-gradients, update-ratio (the optimizer's band, schedules, near-zero init,
parameters without a gradient), loss-scaling.

The severity ladder and the skip reason too. Runs are synthetic (tests/analyze/synthetic.py): the
statistics are set to the value each check compares, so a flipped comparison or an off-by-one in a
check's decision fails a test here.
"""

import pytest
from synthetic import LIN, SyntheticRun, judge, skip_reason


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
    a, got = judge(r.done(), "vanishing-gradients")
    assert [s for s, _ in got] == want


def test_vanishingskip_reason(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.param(0, "0.weight", 1.0, 0.1, 0.01)
    a, _ = judge(r.done(), "vanishing-gradients")
    assert skip_reason(a, "vanishing-gradients").startswith("fewer than two conv/linear weights")


# --- exploding-gradients: output-gradient norm, first/last above 1e3 (error above 1e6) ---------------------
@pytest.mark.parametrize("ratio,want", [(0.9e3, []), (1.1e3, ["warning"]), (0.9e6, ["warning"]), (1.1e6, ["error"])])
def test_exploding_ladder(tmp_path, ratio, want):
    r = SyntheticRun(tmp_path / "r", {str(i): LIN for i in range(4)})
    for step in range(4):
        for i in range(4):
            r.grad(step, str(i), norm=1e-2 * (ratio if i == 0 else 1.0))
    a, got = judge(r.done(), "exploding-gradients")
    assert [s for s, _ in got] == want


def test_explodingskip_reason(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.grad(0, "0", 1.0)
    a, _ = judge(r.done(), "exploding-gradients")
    assert skip_reason(a, "exploding-gradients").startswith("fewer than two parametrised layers")


# --- update-ratio: around the optimizer's centre (SGD 1e-3, Adam 1e-2), warn 2 decades, info 1 -------------
@pytest.mark.parametrize("ratio,want", [
    (0.9e-5, ["warning"]), (1.1e-5, ["info"]), (0.9e-4, ["info"]), (1.1e-4, []), (0.9e-2, []), (1.1e-2, ["info"]),
    (0.9e-1, ["info"]), (1.1e-1, ["warning"]),
])  # fmt: skip
def test_update_ratio_ladder_sgd(tmp_path, ratio, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * ratio)
    a, got = judge(r.done(optimizer={"type": "SGD", "momentum": 0.0}), "update-ratio")
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
    a, got = judge(r.done(optimizer={"type": "SGD", "momentum": momentum}), "update-ratio")
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
    a, got = judge(r.done(optimizer={"type": "AdamW"}), "update-ratio")
    assert [s for s, _ in got] == want


def _scheduled(tmp_path, frac, at_peak, opt="SGD", peak=0.1, numel=256, tail_lrs=None):
    """8 steps: lr ``peak`` for steps 0-3, then ``peak · frac`` (or ``tail_lrs``) for the window 4-7,
    each step's ratio ``at_peak`` scaled by its lr, as SGD and Adam scale it."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    lrs = [peak] * 4 + (tail_lrs or [peak * frac] * 4)
    for step, lr in enumerate(lrs):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * at_peak * lr / peak, numel=numel, lr=lr)
    meta = {"type": opt, "momentum": 0.0} if opt == "SGD" else {"type": opt}
    a, got = judge(r.done(optimizer=meta), "update-ratio")
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
    a, got = judge(r.done(optimizer={"type": "SGD"}, param_init_rms={"0.weight": 0.1, "1.weight": 1e-6}),
                       "update-ratio")  # fmt: skip
    assert got == []  # its ratio (100) would be a warning


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
    a, got = judge(_amp_run(tmp_path, {0, 1, 2, 3} | set(range(50, 50 + k))), "loss-scaling")
    assert [s for s, _ in got] == want
    f = [f for f in a.findings if f.check == "loss-scaling"][0]
    assert f.evidence["window_skip_fraction"] == pytest.approx(k / 50) and f.evidence["skipped_steps"] == 4 + k
    assert f.evidence["window_steps"] == [50, 99]


@pytest.mark.parametrize("last,want", [(1.0, []), (0.5, ["warning"])])
def test_loss_scaling_scale_below_one_warns(tmp_path, last, want):
    a, got = judge(_amp_run(tmp_path, set(), scale_last=last), "loss-scaling")
    assert [s for s, _ in got] == want
    if want:
        assert "fell to 0.5" in a.findings[0].message and a.findings[0].evidence["loss_scale_last"] == 0.5


def test_loss_scaling_skips_without_a_scaler(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.scalar(0, 1.0)
    a, got = judge(r.done(), "loss-scaling")
    assert got == [] and "no GradScaler" in skip_reason(a, "loss-scaling")


# --- update-ratio: parameters without any gradient — info below 10 % of the trainable elements, warning from it --
@pytest.mark.parametrize("unused,want", [(32, "info"), (110, "info"), (112, "warning")])
def test_update_ratio_parameters_without_gradient(tmp_path, unused, want):
    """Regression: DINOv2's mask_token (no gradient without bool_masked_pos) warned 'two decades below
    … frozen by accident'. 1000 + unused trainable elements; 112/1112 ≥ 10 %."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN, "1": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=0.1, update_norm=2.0 * 1e-2, numel=1000, lr=1e-3)
        r.param(step, "1.weight", norm=2.0, grad_norm=float("nan"), update_norm=0.0, numel=unused, lr=1e-3)
    a, got = judge(r.done(optimizer={"type": "AdamW"}), "update-ratio")
    (f,) = [f for f in a.findings if f.check == "update-ratio"]
    assert f.severity == want and f.layer == "1" and f.evidence["no_gradient"] == ["1.weight"]
    assert f.evidence["share_of_trainable"] == pytest.approx(unused / (1000 + unused))
    assert "received no gradient at any recorded step" in f.message


def test_update_ratio_without_any_recorded_gradient_still_judges_the_ratio(tmp_path):
    """A run whose gradient norms were not recorded at all: no 'unused' verdict, the ratio is judged."""
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    for step in range(4):
        r.param(step, "0.weight", norm=2.0, grad_norm=float("nan"), update_norm=0.0)
    a, got = judge(r.done(optimizer={"type": "SGD", "momentum": 0.0}), "update-ratio")
    (f,) = [f for f in a.findings if f.check == "update-ratio"]
    assert f.severity == "warning" and f.evidence["frozen"] == ["0.weight"]
