"""pytorch#180995: grouped ConvTranspose + BN folds wrongly (the output channel of W[i, j] is
(i div (C_in/g))·(C_out/g) + j, not j). normscope folds it exactly."""

import copy

import torch
from fold_testlib import bn_left, randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


def test_grouped_conv_transpose_bn_folds_exactly():
    model = randomize_all(
        nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)), "neg_gamma"
    ).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert [p.pattern for p in res.folded] == ["ConvTranspose2d → BatchNorm2d"]
    assert bn_left(res.model) == 0
    with torch.no_grad():
        assert rel_err(ref(x), res.model(x)) <= 1e-12


def test_naive_channel_indexing_would_be_wrong():
    """The layout matters: scaling W[:, j] by s_j (ignoring groups) changes the output."""
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    bn = randomize_all(nn.Sequential(nn.BatchNorm2d(6)), "neg_gamma").double()[0]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    naive = copy.deepcopy(conv)
    with torch.no_grad():
        naive.weight.mul_(s[: naive.weight.shape[1]].reshape(1, -1, 1, 1))  # C_out/g = 3 columns
        naive.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(bn(conv(x)), naive(x)) > 1e-3
        res = fold_bn(nn.Sequential(conv, bn).eval(), x)
        assert rel_err(bn(conv(x)), res.model(x)) <= 1e-12
