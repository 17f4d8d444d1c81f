"""Bug: ``fold_onnx`` folded 0 BN on every file of the default exporter
(``torch.onnx.export(dynamo=True)``, graph optimisation off), saying "Conv weights are not
constant" while the weight is an initializer and the (zero) bias is computed by
Shape → Expand → CastLike. Such computed constants are now evaluated; a real obstacle is named."""

import pytest
import torch
from torch import nn

from normscope.fold import fold_onnx
from normscope.fold.onnx_util import count_ops, quiet_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _export(model, x, path):
    with quiet_export():
        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, opset_version=18)
    return onnx.load(str(path))


def test_dynamo_file_with_computed_conv_bias_folds(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
    ).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    src = tmp_path / "dynamo.onnx"
    proto = _export(model, torch.randn(1, 3, 6, 6), src)
    assert count_ops(proto) == 2 and count_ops(proto, "Expand") > 0  # the bias is computed
    res = fold_onnx(src, tmp_path / "folded.onnx")
    assert res.bn_nodes_left == 0 and len(res.folded) == 2 and res.verified


def test_conv_weight_that_is_really_computed_is_named(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 1, 1))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(nn.functional.conv2d(x, self.w * x.mean()))  # the weight depends on the input

    src = tmp_path / "computed.onnx"
    _export(Scaled().eval(), torch.randn(1, 3, 4, 4), src)
    res = fold_onnx(src, tmp_path / "out.onnx")
    assert res.bn_nodes_left == 1
    reason = res.skipped[0].reason
    assert "weight" in reason and "is computed by Mul" in reason
