"""Thresholds of the unit and normalisation checks, each just above and just below: dead-units,
saturation, small-batch-bn, syncbn-recommended, bn-momentum, norm-scale-init.

The severity ladder and the skip reason too. Runs are synthetic (tests/analyze/synthetic.py): the
statistics are set to the value each check compares, so a flipped comparison or an off-by-one in a
check's decision fails a test here.
"""

import numpy as np
import pytest
from synthetic import LIN, SyntheticRun, judge, skip_reason


# --- dead-units: warn 0.10, error 0.40 (fraction of units never active over the window) ------------------
@pytest.mark.parametrize("dead,want", [(0, []), (9, ["info"]), (11, ["warning"]), (39, ["warning"]), (41, ["error"])])
def test_dead_units_ladder(tmp_path, dead, want):
    r = SyntheticRun(tmp_path / "r", {"0": LIN, "1": {"type": "ReLU", "family": "relu"}})
    for step in range(10):
        act = np.full(100, 64)
        act[:dead] = 0
        r.stat(step, "1", channels=100, active=act, ch_mean=np.ones(100))
    a, got = judge(r.done(), "dead-units")
    assert [s for s, _ in got] == want


def test_dead_units_skips(tmp_path):
    r = SyntheticRun(tmp_path / "a", {"0": LIN})
    r.stat(0, "0")
    a, _ = judge(r.done(), "dead-units")
    assert skip_reason(a, "dead-units").startswith("no ReLU-family layer")
    r = SyntheticRun(tmp_path / "b", {"1": {"type": "ReLU", "family": "relu"}})
    for step in range(3):
        r.stat(step, "1", samples=8, channels=10, active=np.zeros(10))
    a, _ = judge(r.done(), "dead-units")
    assert "too few to call a unit dead" in skip_reason(a, "dead-units")


# --- saturation: warn 0.2, error 0.5 (saturated fraction over the final window) ---------------------------
@pytest.mark.parametrize("frac,want", [(0.19, []), (0.21, ["warning"]), (0.49, ["warning"]), (0.51, ["error"])])
def test_saturation_ladder(tmp_path, frac, want):
    r = SyntheticRun(tmp_path / "r", {"1": {"type": "Sigmoid", "sat": "sigmoid", "family": "sigmoid"}})
    for step in range(10):
        r.stat(step, "1", frac_sat=frac)
    a, got = judge(r.done(), "saturation")
    assert [s for s, _ in got] == want


def test_saturationskip_reason(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = judge(r.done(), "saturation")
    assert skip_reason(a, "saturation").startswith("no saturating activation")


# --- small-batch-bn: warn below 16, error below 4 samples per replica ------------------------------------
@pytest.mark.parametrize("batch,want", [(16, []), (15, ["warning"]), (4, ["warning"]), (3, ["error"])])
def test_small_batch_bn_ladder(tmp_path, batch, want):
    r = SyntheticRun(tmp_path / "r", {"1": {"type": "BatchNorm2d", "role": "norm"}})
    for step in range(4):
        r.stat(step, "1", output="input", samples=batch)
        r.stat(step, "1", samples=batch)
    a, got = judge(r.done(), "small-batch-bn")
    assert [s for s, _ in got] == want


# --- syncbn-recommended: under torch.distributed, warn below 16 samples per rank -------------------------
@pytest.mark.parametrize("batch,world,want", [(16, 2, []), (15, 2, ["warning"]), (8, 1, None)])
def test_syncbn_threshold_andskip_reason(tmp_path, batch, world, want):
    r = SyntheticRun(tmp_path / "r", {"1": {"type": "BatchNorm2d", "role": "norm"}})
    for step in range(3):
        r.stat(step, "1", output="input", samples=batch)
    a, got = judge(r.done(distributed={"world_size": world}), "syncbn-recommended")
    if want is None:
        assert "torch.distributed" in skip_reason(a, "syncbn-recommended")
    else:
        assert [s for s, _ in got] == want


# --- bn-momentum: warn at a BatchNorm momentum ≥ 0.5 (PyTorch's convention: the newest batch's weight) ---
@pytest.mark.parametrize("momentum,want", [(0.1, []), (0.49, []), (0.5, ["warning"]), (0.997, ["warning"]),
                                           (1.0, ["warning"]), (None, [])])  # fmt: skip
def test_bn_momentum_threshold(tmp_path, momentum, want):
    bn = {"type": "BatchNorm2d", "role": "norm", "bn": True, "momentum": momentum, "track_running_stats": True}
    r = SyntheticRun(tmp_path / "r", {"1": bn, "2": dict(bn, track_running_stats=False, momentum=0.9)})
    r.stat(0, "1")
    a, got = judge(r.done(), "bn-momentum")
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
    a, _ = judge(r.done(), "bn-momentum")
    assert skip_reason(a, "bn-momentum").startswith("no BatchNorm layer")
    r = SyntheticRun(tmp_path / "o", {"1": {"type": "BatchNorm2d", "role": "norm"}})  # a run from before the record
    r.stat(0, "1")
    a, _ = judge(r.done(), "bn-momentum")
    assert skip_reason(a, "bn-momentum").startswith("BatchNorm momentum not recorded")


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
    a, got = judge(_norm_init_run(tmp_path, gammas), "norm-scale-init")
    assert [s for s, _ in got] == want


@pytest.mark.parametrize("last,want", [(1.1e-3, "warning"), (0.9e-3, "error")])
def test_norm_scale_init_collapse(tmp_path, last, want):
    a, got = judge(_norm_init_run(tmp_path, [0.02] * 3, out_rms=[1.0, 0.1, last]), "norm-scale-init")
    (f,) = [f for f in a.findings if f.check == "norm-scale-init"]
    assert f.severity == want and f.evidence["output_rms_last_over_first"] == pytest.approx(last, rel=1e-6)
    assert [x["layer"] for x in f.evidence["layers"]] == ["0", "1", "2"] and f.evidence[
        "init_rms_median"
    ] == pytest.approx(0.02)


def test_norm_scale_init_skips(tmp_path):
    r = SyntheticRun(tmp_path / "r", {"0": LIN})
    r.stat(0, "0")
    a, _ = judge(r.done(param_init_rms={"0.weight": 0.02}), "norm-scale-init")
    assert skip_reason(a, "norm-scale-init").startswith("no normalisation layer")
