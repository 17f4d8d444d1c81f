"""eval-in-train-mode and frozen-bn-drift on synthetic runs: every threshold just above and just
below, the severity ladder, the skip reasons (the fixtures cover the collector end to end)."""

import math

import pytest
from synthetic import SyntheticRun

from normscope.analyze import analyze_full

LIN = {"type": "Linear", "params": 10}
BN = {"type": "BatchNorm2d", "params": 32}


def _run(tmp_path, modes, signals=()):
    r = SyntheticRun(tmp_path / "r", {"0": LIN, "1": BN})
    for step in range(4):
        r.stat(step, "0")
        r.param(step, "0.weight", 1.0, 0.1, 1e-3)
    for row in signals:
        r.signal(*row)
    return r.done(modes=modes)


def _modes(events=None, train=40, fed=(), bn=1, dropout=1, frozen=None):
    return {"batchnorm": bn, "dropout": dropout, "forwards": {"train": train, "eval": 0}, "events": events or {},
            "metrics_fed": list(fed), "frozen_bn": frozen or {}}  # fmt: skip


def _event(n, **kw):
    return {"forwards": n, "first_step": 1, "last_step": 9, "steps": [1, 5, 9], "bn_train": 1, "bn_eval": 0,
            "dropout_train": 1, "dropout_eval": 0, "metrics": []} | kw  # fmt: skip


def _got(run, check):
    a = analyze_full(run, checks=[check])
    return a, [(f.severity, f.evidence.get("cause")) for f in a.findings if f.check == check]


@pytest.mark.parametrize(
    "n,train,fed,want",
    [(10, 40, (), "warning"), (40, 40, (), "warning"), (41, 40, (), "error"), (1, 40, ("loss",), "error")],
)
def test_eval_in_train_mode_ladder(tmp_path, n, train, fed, want):
    run = _run(tmp_path, _modes({"eval-in-train-mode:no_grad": _event(n)}, train=train, fed=fed))
    a, got = _got(run, "eval-in-train-mode")
    assert got == [(want, "eval-in-train-mode")]
    f = a.findings[0]
    assert f.step == (1, 9) and f.evidence["forwards"] == n
    assert ("'loss'" in f.message) == bool(fed)


def test_eval_in_train_mode_reverse_and_silence(tmp_path):
    rev = _event(30, bn_train=0, bn_eval=2, dropout_train=0, dropout_eval=1)
    _, got = _got(_run(tmp_path / "a", _modes({"train-in-eval-mode": rev})), "eval-in-train-mode")
    assert got == [("warning", "train-in-eval-mode")]
    _, got = _got(_run(tmp_path / "b", _modes()), "eval-in-train-mode")
    assert got == []
    a, _ = _got(_run(tmp_path / "c", _modes(bn=0, dropout=0)), "eval-in-train-mode")
    assert "mode changes nothing" in {s.check: s.reason for s in a.skipped}["eval-in-train-mode"]
    r = SyntheticRun(tmp_path / "d", {"0": LIN})
    r.stat(0, "0")
    a = analyze_full(r.done(), checks=["eval-in-train-mode"])
    assert "no train/eval mode audit" in a.skipped[0].reason


def _drift(step, mean, lvar, in_train=1):
    return [(step, "1", "bn_mean_drift", mean), (step, "1", "bn_mean_drift_max", 2 * mean),
            (step, "1", "bn_var_log_ratio", lvar), (step, "1", "bn_var_log_ratio_max", abs(lvar) * 2),
            (step, "1", "bn_train_forwards", float(in_train))]  # fmt: skip


@pytest.mark.parametrize(
    "mean,ratio,want",
    [(0.09, 1.0, "info"), (0.11, 1.0, "warning"), (0.0, 0.81, "info"), (0.0, 0.79, "warning"),
     (0.0, 1.24, "info"), (0.0, 1.26, "warning")],
)  # fmt: skip
def test_frozen_bn_drift_thresholds(tmp_path, mean, ratio, want):
    rows = _drift(0, 0.0, 0.0) + _drift(3, mean, math.log(ratio))
    run = _run(tmp_path, _modes(frozen={"1": "requires_grad=False"}), rows)
    a, got = _got(run, "frozen-bn-drift")
    assert [s for s, _ in got] == [want]
    assert a.findings[0].evidence["var_ratio"] == pytest.approx(ratio)


def test_frozen_bn_kept_in_eval_is_silent_and_skips(tmp_path):
    rows = _drift(0, 0.0, 0.0, in_train=0) + _drift(3, 0.5, 0.0, in_train=0)
    _, got = _got(_run(tmp_path / "a", _modes(frozen={"1": "affine=False"}), rows), "frozen-bn-drift")
    assert got == []
    a, _ = _got(_run(tmp_path / "b", _modes()), "frozen-bn-drift")
    assert "no BatchNorm layer with frozen affine" in {s.check: s.reason for s in a.skipped}["frozen-bn-drift"]


@pytest.mark.parametrize(
    "events,want",
    [
        ({"train-in-eval-mode": _event(3, bn_train=0, bn_eval=1)}, "never updated"),
        ({"train-in-eval-mode": _event(3, bn_train=0, bn_eval=0, dropout_eval=1)}, None),  # dropout only
        ({"eval-in-train-mode:no_grad": _event(3)}, "updated its running statistics on evaluation"),
        ({"eval-in-train-mode:no_grad": _event(3, bn_train=0)}, None),  # only dropout was in train mode
        ({}, None),
    ],
)
def test_stale_running_stats_blames_the_mode_only_when_bn_was_affected(tmp_path, events, want):
    from normscope.analyze.checks.stale_running_stats import _mode_cause
    from normscope.analyze.context import Context

    cause = _mode_cause(Context(_run(tmp_path, _modes(events))))
    assert (cause is None) if want is None else (want in cause)
