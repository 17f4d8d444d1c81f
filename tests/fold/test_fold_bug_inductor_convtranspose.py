"""Inductor freezing folds ConvTranspose(6, 6) + BN wrongly (it scales the weight's dim 0, which
for a transposed conv is the *input* channel). normscope scales the output channel axis."""

import copy

import torch
from fold_testlib import bn_left, randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


def test_conv_transpose_6_6_bn():
    model = randomize_all(
        nn.Sequential(nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)), "neg_gamma"
    ).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert len(res.folded) == 1 and bn_left(res.model) == 0
    with torch.no_grad():
        assert rel_err(ref(x), res.model(x)) <= 1e-12
        # scaling dim 0 instead (the wrong fold) gives a different function
        conv, bn = copy.deepcopy(model[0]), model[1]
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(s.reshape(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
        assert rel_err(ref(x), conv(x)) > 1e-3
