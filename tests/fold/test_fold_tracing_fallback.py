"""Models that do not trace with torch.fx: the data flow is recorded from one real forward; where
that forward turns tensor data into Python values (data-dependent control flow), the folds under
it are refused with the reason; the result is never wrong, on either branch."""

import copy

import torch
from fold_testlib import randomize_all, rel_err
from torch import nn

from normscope.fold import fold_bn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.scale = 1.0

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.scale


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.block = Block()

    def forward(self, x):
        y = self.stem_bn(self.stem(x))
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this forward
            return self.block(y) + self.block.scale
        return self.block(-y)


def test_data_dependent_forward_is_refused_under_it():
    model = randomize_all(DataDependent(), "neg_gamma").double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert res.tracing == "dataflow"
    assert "" in res.untraced  # why fx did not trace the whole model
    assert res.folded == [] and sorted(s.bn for s in res.skipped) == ["block.bn", "stem_bn"]
    assert all("control flow may depend on the data" in s.reason and "Tensor.__bool__" in s.reason for s in res.skipped)
    assert not res.all_folded
    for inp in (x, -x):  # both branches
        with torch.no_grad():
            assert rel_err(ref(inp), res.model(inp)) == 0


class ShapeBranch(nn.Module):
    """Control flow on shapes only (like transformers' models): fx fails, the recorded data flow folds."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.block = Block()

    def forward(self, x):
        if int(x.shape[-1]) % 2:  # int() of a proxy: fx cannot trace this
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.block(self.stem_bn(self.stem(x)))


def test_shape_dependent_forward_folds_from_the_recorded_data_flow():
    model = randomize_all(ShapeBranch(), "neg_gamma").double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    res = fold_bn(model, x)
    assert res.tracing == "dataflow" and res.all_folded
    assert sorted(p.bn for p in res.folded) == ["block.bn", "stem_bn"]
    assert isinstance(res.model.block, Block)  # the module tree is kept, only leaves change
    for inp in (x, torch.randn(1, 3, 5, 5, dtype=torch.float64)):
        with torch.no_grad():
            assert rel_err(model(inp), res.model(inp)) <= 1e-12


def test_nothing_traces():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            if x.mean() > 0:
                return self.bn(self.conv(x))
            return self.conv(x)

    model = randomize_all(Opaque(), "neg_gamma")
    x = torch.randn(1, 3, 4, 4)
    res = fold_bn(model, x)
    assert res.tracing == "dataflow" and res.folded == []
    assert "control flow may depend on the data" in res.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x)) and torch.equal(res.model(-x), model(-x))


def test_export_falls_back_to_torchscript_and_says_so(tmp_path):
    from normscope.fold import export_onnx

    model = randomize_all(DataDependent(), "neg_gamma")
    res = export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "m.onnx")
    assert res.exporter == "torchscript" and res.exporter_error
    assert any("TracerWarning" in n for n in res.notes)
    assert res.fold.tracing == "dataflow" and res.verified


class RandomBranch(nn.Module):
    """A branch on a random draw: the recorded run proves nothing about the other branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        if int(x.shape[0]) >= 0 and torch.rand(()) < 2:  # always true, but fx/one run cannot know
            return self.bn(y)
        return y


def test_branch_on_a_random_draw_is_refused():
    model = randomize_all(RandomBranch(), "neg_gamma")
    x = torch.randn(1, 3, 4, 4)
    res = fold_bn(model, x)
    assert res.tracing == "dataflow" and res.folded == []
    assert "control flow may depend on the data" in res.skipped[0].reason


def test_inplace_on_the_recorded_data_flow():
    model = randomize_all(ShapeBranch(), "neg_gamma").double()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    res = fold_bn(model, x, inplace=True)
    assert res.model is model and res.tracing == "dataflow" and res.all_folded
    assert isinstance(model.stem_bn, nn.Identity) and isinstance(model.block.bn, nn.Identity)
    with torch.no_grad():
        assert rel_err(ref(x), model(x)) <= 1e-12
