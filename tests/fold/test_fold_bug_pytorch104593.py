"""pytorch#104593: a conv used both with and without BN. Folding the BN into the conv module
would change the call site without BN. normscope folds into a fresh copy used only at the BN
call site and leaves the other call site untouched."""

import copy

import torch
from fold_testlib import bn_left, randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_shared_conv_is_copied_for_the_bn_call_site():
    model = randomize_all(Shared(), "neg_gamma").double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert len(res.folded) == 1 and not res.skipped
    pair = res.folded[0]
    assert pair.copy_of == "conv" and pair.layer != "conv"
    assert bn_left(res.model) == 0
    assert torch.equal(res.model.conv.weight, model.conv.weight)  # the other call site: untouched
    with torch.no_grad():
        assert rel_err(ref(x), res.model(x)) <= 1e-12


def test_inplace_refuses_the_shared_conv():
    model = randomize_all(Shared(), "neg_gamma")
    res = fold_bn(model, torch.randn(1, 3, 4, 4), inplace=True)
    assert res.folded == []
    assert "inplace=False" in res.skipped[0].reason
    assert res.error.max_abs == 0.0


def test_conv_output_used_twice_is_refused():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_all(TwoUsers(), "neg_gamma")
    x = torch.randn(1, 3, 4, 4)
    res = fold_bn(model, x)
    assert res.folded == [] and "2 consumers" in res.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x))
