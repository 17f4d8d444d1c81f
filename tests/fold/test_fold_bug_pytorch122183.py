"""pytorch#122183: Linear + BatchNorm1d(affine=False) fails to fold (γ, β are None). normscope
uses γ = 1, β = 0."""

import copy

import torch
from fold_testlib import bn_left, randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


def test_linear_bn1d_affine_false():
    model = randomize_all(nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5, affine=False)), "affine_false").double()
    x = torch.randn(8, 10, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert [p.pattern for p in res.folded] == ["Linear → BatchNorm1d"]
    assert bn_left(res.model) == 0
    with torch.no_grad():
        assert rel_err(ref(x), res.model(x)) <= 1e-12
