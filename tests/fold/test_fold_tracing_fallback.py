"""Models that do not trace with torch.fx: children are traced one by one, BNs called from the
untraced forward are left alone with a reason; the result is never wrong."""

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


def test_partial_tracing_folds_inside_traceable_children():
    model = randomize_all(DataDependent(), "neg_gamma").double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert res.tracing == "torch.fx-partial"
    assert "" in res.untraced
    assert [p.bn for p in res.folded] == ["block.bn"]
    assert [s.bn for s in res.skipped] == ["stem_bn"]
    assert "does not trace" in res.skipped[0].reason
    for inp in (x, -x):  # both branches
        with torch.no_grad():
            assert rel_err(ref(inp), res.model(inp)) <= 1e-12
    assert torch.equal(model.block.conv.weight, ref.block.conv.weight)


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
    assert res.tracing == "none" and res.folded == []
    assert "does not trace" in res.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x)) and torch.equal(res.model(-x), model(-x))


def test_export_falls_back_to_torchscript_and_says_so(tmp_path):
    from normscope.fold import export_onnx

    model = randomize_all(DataDependent(), "neg_gamma")
    res = export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "m.onnx")
    assert res.exporter == "torchscript" and res.exporter_error
    assert any("TracerWarning" in n for n in res.notes)
    assert res.fold.tracing == "torch.fx-partial" and res.verified
