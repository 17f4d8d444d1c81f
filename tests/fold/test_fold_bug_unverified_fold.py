"""Bug: the float64 check measured but did not gate: a fold with a relative error of 0.17–0.62
was reported as a number and the wrong model handed back. Now a fold whose check exceeds the
tolerance is undone (found by bisection) and refused with the measured error; the others stay."""

from unittest import mock

import torch
from fold_testlib import both_paths, randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn
from normscope.fold import formulas as fm

_real = fm.fold_into_producer


def _wrong_for_five_channels(weight, bias, s, t, kind, groups=1):
    w, b = _real(weight, bias, s, t, kind, groups)
    if s.numel() == 5:  # a broken formula for one layer: the check must catch it
        b = b + 1.0
    return w, b


def _net():
    torch.manual_seed(0)
    return randomize_all(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3),
            nn.BatchNorm2d(5),
            nn.ReLU(),
            nn.Conv2d(5, 6, 1),
            nn.BatchNorm2d(6),
        ),
        "neg_gamma",
    )


def test_a_fold_that_fails_the_check_is_undone_and_refused():
    x = torch.randn(2, 3, 8, 8)
    for path, model in both_paths(_net()):
        with mock.patch.object(fm, "fold_into_producer", _wrong_for_five_channels):
            res = fold_bn(model, x)
        assert res.tracing == path
        assert sorted(p.bn.split(".")[-1] for p in res.folded) == ["1", "7"]
        (bad,) = res.skipped
        assert bad.bn.endswith("4") and "float64 check failed" in bad.reason and "tolerance 0.0001" in bad.reason
        assert not res.all_folded and res.error.max_rel <= 1e-4
        with torch.no_grad():
            assert rel_err(model(x), res.model(x)) <= 1e-4


def test_inplace_gate_leaves_the_failing_pair_in_the_model():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    ref = _net()
    with mock.patch.object(fm, "fold_into_producer", _wrong_for_five_channels):
        res = fold_bn(model, x, inplace=True)
    assert [s.bn for s in res.skipped] == ["4"] and isinstance(model[4], nn.BatchNorm2d)
    assert isinstance(model[1], nn.Identity) and isinstance(model[7], nn.Identity)
    with torch.no_grad():
        assert rel_err(ref(x), model(x)) <= 1e-4


def test_tolerance_is_the_gate():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    with mock.patch.object(fm, "fold_into_producer", _wrong_for_five_channels):
        res = fold_bn(model, x, tolerance=1e9)  # the caller accepts anything: nothing is undone
    assert len(res.folded) == 3 and res.error.max_rel > 1e-3
