"""fold_onnx on files whose modules are local ONNX functions (legacy exporter,
``export_modules_as_functions``): the functions are inlined (exact) and every BN folds."""

import pytest
import torch
from torch import nn

from normscope.fold import fold_onnx
from normscope.fold.onnx_util import count_ops, quiet_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class ConvBN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_bn_inside_local_functions_folds(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(4), ConvBN(4)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    src = tmp_path / "functions.onnx"
    with quiet_export():
        torch.onnx.export(
            model,
            (torch.randn(1, 4, 5, 5),),
            str(src),
            dynamo=False,
            opset_version=18,
            do_constant_folding=False,
            export_modules_as_functions={ConvBN},
        )
    proto = onnx.load(str(src))
    assert len(proto.functions) >= 1 and count_ops(proto) >= 1
    res = fold_onnx(src, tmp_path / "folded.onnx")
    assert res.bn_nodes_left == 0 and len(res.folded) == 2 and res.verified
    assert len(onnx.load(str(tmp_path / "folded.onnx")).functions) == 0
