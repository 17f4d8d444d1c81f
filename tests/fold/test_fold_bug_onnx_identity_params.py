"""Bug: ``fold_onnx`` folded 0 of 56 BN when the legacy exporter routed identical parameters
(default-initialised BN: γ = 1, β = 0, μ = 0, σ² = 1) through ``Identity`` nodes: the BN inputs
were not initializers. Constants are now followed through Identity (and other small pure ops)."""

import pytest
import torch
from torch import nn

from normscope.fold import fold_onnx
from normscope.fold.onnx_util import count_ops, quiet_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def test_identity_routed_bn_parameters_fold(tmp_path):
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    model = nn.Sequential(*layers).eval()  # default BN parameters: all identical
    src = tmp_path / "legacy.onnx"
    with quiet_export():
        torch.onnx.export(
            model, (torch.randn(1, 4, 6, 6),), str(src), dynamo=False, opset_version=18, do_constant_folding=False
        )
    proto = onnx.load(str(src))
    assert count_ops(proto) == 4 and count_ops(proto, "Identity") > 0  # the case of the bug
    res = fold_onnx(src, tmp_path / "folded.onnx")
    assert len(res.folded) == 4 and res.bn_nodes_left == 0 and res.skipped == []
    assert res.verified and res.max_rel_err <= 1e-5
    assert count_ops(onnx.load(str(tmp_path / "folded.onnx")), "Identity") == 0  # dead routing removed
