"""pytorch#119264: Linear(10, 5) applied on a (2, 5, 3, 10) tensor, then BatchNorm2d(5). Module
names suggest Linear → BN, but BN normalises axis 1 (size 5) while the Linear writes its
features on the last axis: it must not fold, and the output must stay right."""

import torch
from fold_testlib import randomize_all
from torch import nn

from normscope.fold import fold_bn


def test_linear_on_4d_then_bn2d_is_refused_with_reason():
    model = randomize_all(nn.Sequential(nn.Linear(10, 5), nn.BatchNorm2d(5)), "neg_gamma")
    x = torch.randn(2, 5, 3, 10)
    res = fold_bn(model, x)
    assert res.folded == []
    assert len(res.skipped) == 1
    reason = res.skipped[0].reason
    assert "axis 1" in reason and "axis 3" in reason, reason
    assert res.error.max_abs == 0.0
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x))


def test_linear_on_3d_then_bn1d_on_wrong_axis_is_refused():
    # (N, L, C) → Linear → (N, L, 5) → BatchNorm1d(L = 5) normalises L, not the features
    model = randomize_all(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)), "neg_gamma")
    x = torch.randn(3, 5, 4)
    res = fold_bn(model, x)
    assert res.folded == [] and "axis 1" in res.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x))
