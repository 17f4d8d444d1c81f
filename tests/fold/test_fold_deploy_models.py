"""ResNet-style and MobileNetV2-style fixtures: every BN folded, the ONNX file has no
BatchNormalization node, and onnxruntime (no graph optimisation) matches the unfolded model."""

import copy

import onnx
import pytest
import torch
from fold_testlib import bn_left, rel_err

from fixtures.deploy_models import mobilenet_v2_tiny, resnet_tiny
from normscope.fold import export_onnx, fold_bn
from normscope.fold.onnx_export import run_onnx

MODELS = {"resnet": resnet_tiny, "mobilenet_v2": mobilenet_v2_tiny}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_bn_folds(name):
    model = MODELS[name]()
    n_bn = bn_left(model)
    x = torch.randn(2, 3, 32, 32)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert res.tracing == "torch.fx" and not res.skipped
    assert len(res.folded) == n_bn and bn_left(res.model) == 0
    assert res.error.max_rel <= 1e-6
    with torch.no_grad():
        assert rel_err(ref.double()(x.double()), res.model(x)) <= 1e-4
    if name == "mobilenet_v2":
        assert any(p.layer.startswith("features.1.conv.0") for p in res.folded)  # the depthwise conv


@pytest.mark.parametrize("name", list(MODELS))
def test_export_has_no_bn_and_matches_onnxruntime(name, tmp_path):
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"{name}.onnx"
    res = export_onnx(model, x, path)
    assert res.exporter == "dynamo"
    assert res.bn_nodes_left == 0
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node) == 0
    assert res.verified and res.max_rel_err <= 1e-4
    assert res.fold is not None and not res.fold.skipped
    with torch.no_grad():  # independent check of the file
        (out,) = run_onnx(str(path), (x,))
        assert rel_err(model.double()(x.double()), torch.from_numpy(out)) <= 1e-4
    d = res.to_dict()
    assert d["bn_nodes_left"] == 0 and d["fold"]["tracing"] == "torch.fx"
