"""Bugs where a parent module does not trace with torch.fx: a raw ``TypeError`` when the parent
indexes a folded ``nn.Sequential`` child (``self.block[0](x)``: the child had become a
GraphModule), a raw ``AttributeError`` when a folded child's plain attributes were read after a
``copy.deepcopy``. The data-flow path keeps the module tree (only leaves change), so both work."""

import copy

import torch
from fold_testlib import randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


class Indexing(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        n = int(x.shape[1])  # int() of a proxy: not traceable
        h = self.block[0](x[:, :n])
        h = self.block[2](self.block[1](h))
        return self.head(h)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.scale = 0.5  # a plain attribute read by the parent
        self.tag = "keep me"

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


class ReadsAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.child = Scaled()

    def forward(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square inputs only")
        h = self.child(self.stem(x))
        return h + self.child.scale


def test_parent_indexing_a_folded_sequential():
    model = randomize_all(Indexing(), "neg_gamma").double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    res = fold_bn(model, x)
    assert res.tracing == "dataflow" and res.all_folded and len(res.folded) == 2
    assert isinstance(res.model.block, nn.Sequential) and isinstance(res.model.block[1], nn.Identity)
    with torch.no_grad():
        assert rel_err(model(x), res.model(x)) <= 1e-12


def test_attribute_carrying_children_survive_deepcopy():
    model = randomize_all(ReadsAttributes(), "neg_gamma").double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    res = fold_bn(model, x)
    assert res.tracing == "dataflow" and res.all_folded
    again = copy.deepcopy(res.model)
    assert again.child.scale == 0.5 and again.child.tag == "keep me"
    with torch.no_grad():
        assert rel_err(model(x), again(x)) <= 1e-12


def test_fx_result_keeps_plain_attributes_across_deepcopy():
    model = randomize_all(Scaled(), "neg_gamma")
    res = fold_bn(model, torch.randn(1, 4, 5, 5))
    assert res.tracing == "torch.fx"
    again = copy.deepcopy(res.model)
    assert again.scale == 0.5 and again.tag == "keep me"


class ReadsBNAttribute(nn.Module):
    """The forward reads a plain attribute of the BN module it calls: swapping the BN for
    nn.Identity would raise AttributeError in the folded model."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if int(x.shape[1]) != 3:
            raise ValueError("3 channels")
        h = self.bn(self.conv(x)) * (self.bn.num_features / 4)
        return self.bn2(self.conv2(h))


def test_fold_that_breaks_the_forward_is_undone_with_the_reason():
    model = randomize_all(ReadsBNAttribute(), "neg_gamma").double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    res = fold_bn(model, x)
    assert [p.bn for p in res.folded] == ["bn2"]
    (skip,) = res.skipped
    assert skip.bn == "bn" and "fails on the example inputs (AttributeError" in skip.reason
    with torch.no_grad():
        assert rel_err(model(x), res.model(x)) <= 1e-12
