"""Cases where torch.fx's ``fuse`` returns a wrong model (measured in issue 18): Linear(C, C)
applied to (N, C, C) then BatchNorm1d (BN normalises axis 1, Linear writes axis 2), and a conv
called twice with a BN after only one of the calls. normscope refuses the first with the reason
and folds the second into a copy used only at that call site."""

import torch
from fold_testlib import both_paths, randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


class SquareLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):  # x: (N, 4, 4)
        return self.bn(self.fc(x))


class ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_linear_on_square_input_is_not_folded_on_the_wrong_axis():
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    for path, model in both_paths(randomize_all(SquareLinear(), "neg_gamma").double()):
        res = fold_bn(model, x)
        assert res.tracing == path and res.folded == []
        assert "normalises axis 1" in res.skipped[0].reason and "axis 2" in res.skipped[0].reason
        with torch.no_grad():
            assert torch.equal(model(x), res.model(x))


def test_conv_called_twice_with_bn_after_one_call():
    model = randomize_all(ConvTwice(), "neg_gamma").double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    res = fold_bn(model, x)  # torch.fx: the BN site gets its own folded copy
    assert len(res.folded) == 1 and res.folded[0].copy_of == "conv"
    with torch.no_grad():
        assert rel_err(model(x), res.model(x)) <= 1e-12
    _, wrapped = both_paths(model)[1]
    res = fold_bn(wrapped, x)  # recorded data flow: no rewiring possible, refused with the reason
    assert res.folded == [] and "called at 2 sites" in res.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(wrapped(x), res.model(x))
