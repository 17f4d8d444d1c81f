"""fold_onnx on files exported without folding (they contain BatchNormalization), and on small
hand-built graphs for Gemm / MatMul(+Add) / BN → Conv."""

import numpy as np
import onnx
import pytest
import torch
from fold_testlib import randomize_all
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fixtures.deploy_models import mobilenet_v2_tiny, resnet_tiny
from normscope.errors import NormscopeError
from normscope.fold import fold_onnx
from normscope.fold.onnx_util import count_ops, quiet_export


def _export_unfolded(model, x, path):
    """TorchScript exporter without constant folding keeps BatchNormalization nodes."""
    with quiet_export():
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=17)
    assert count_ops(onnx.load(str(path))) > 0
    return path


@pytest.mark.parametrize("build", [resnet_tiny, mobilenet_v2_tiny])
def test_fixture_models(build, tmp_path):
    src = _export_unfolded(build(), torch.randn(1, 3, 32, 32), tmp_path / "in.onnx")
    res = fold_onnx(src, tmp_path / "out.onnx")
    assert res.bn_nodes_left == 0 and not res.skipped
    assert count_ops(onnx.load(str(tmp_path / "out.onnx"))) == 0
    assert res.verified and res.max_rel_err <= 1e-5


def test_torch_patterns(tmp_path):
    model = randomize_all(
        nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
            nn.BatchNorm2d(6),
            nn.ReLU(),  # grouped ConvTranspose
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 4, 1, groups=2),  # BN → Conv, pads 0
            nn.Flatten(),
            nn.Linear(4 * 11 * 11, 5),
            nn.BatchNorm1d(5, affine=False),  # Gemm
        ),
        "neg_gamma",
    )
    src = _export_unfolded(model, torch.randn(2, 4, 5, 5), tmp_path / "in.onnx")
    res = fold_onnx(src, tmp_path / "out.onnx")
    assert sorted(p.pattern for p in res.folded) == [
        "BatchNormalization → Conv",
        "ConvTranspose → BatchNormalization",
        "Gemm → BatchNormalization",
    ]
    assert res.bn_nodes_left == 0 and res.verified and res.max_rel_err <= 1e-5


def test_chains_fold_one_after_another(tmp_path):
    model = randomize_all(
        nn.Sequential(
            nn.Conv2d(4, 6, 3),
            nn.BatchNorm2d(6),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.BatchNorm2d(6),
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 4, 1),
        ),
        "neg_gamma",
    )
    src = _export_unfolded(model, torch.randn(2, 4, 5, 5), tmp_path / "in.onnx")
    res = fold_onnx(src, tmp_path / "out.onnx")
    assert [p.role for p in res.folded] == ["producer", "producer", "consumer", "consumer"]
    assert res.bn_nodes_left == 0 and res.verified and res.max_rel_err <= 1e-5


def _bn_nodes(c, prefix="bn"):
    rng = np.random.default_rng(0)
    gamma = rng.standard_normal(c).astype(np.float32)
    gamma[0] = -1.5
    inits = [
        numpy_helper.from_array(a.astype(np.float32), f"{prefix}_{n}")
        for n, a in (
            ("g", gamma),
            ("b", rng.standard_normal(c)),
            ("m", rng.standard_normal(c) * 2),
            ("v", rng.uniform(0.1, 2, c)),
        )
    ]
    return inits, [f"{prefix}_{n}" for n in "gbmv"]


def _save(nodes, inits, x_shape, y_shape, path):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_matmul_add_and_matmul_alone(tmp_path):
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    bn_inits, names = _bn_nodes(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["a"]),
        helper.make_node("BatchNormalization", ["a", *names], ["y"]),
    ]
    res = fold_onnx(_save(nodes, [w, b, *bn_inits], [2, 4], [2, 3], tmp_path / "a.onnx"), tmp_path / "a_out.onnx")
    assert [p.pattern for p in res.folded] == ["MatMul + Add → BatchNormalization"] and res.verified
    assert res.bn_nodes_left == 0
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("BatchNormalization", ["mm", *names], ["y"]),
    ]
    res = fold_onnx(_save(nodes, [w, *bn_inits], [2, 4], [2, 3], tmp_path / "b.onnx"), tmp_path / "b_out.onnx")
    assert res.folded[0].pattern.startswith("MatMul → BatchNormalization") and res.verified
    assert res.bn_nodes_left == 0


def test_refusals(tmp_path):
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    bn_inits, names = _bn_nodes(3)
    # rank-3 MatMul output: BN's axis 1 is not the MatMul's feature axis
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("BatchNormalization", ["mm", *names], ["y"]),
    ]
    res = fold_onnx(_save(nodes, [w, *bn_inits], [2, 3, 4], [2, 3, 3], tmp_path / "c.onnx"), tmp_path / "c_out.onnx")
    assert res.folded == [] and "rank is 3" in res.skipped[0].reason and res.verified
    # BN → Conv with zero padding; conv output also used elsewhere
    cw = numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "cw")
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", *names], ["n"]),
        helper.make_node("Add", ["c", "n"], ["s"]),
        helper.make_node("Conv", ["s", "cw"], ["y"], pads=[1, 1, 1, 1]),
    ]
    res = fold_onnx(
        _save(nodes, [cw, *bn_inits], [1, 3, 5, 5], [1, 3, 5, 5], tmp_path / "d.onnx"), tmp_path / "d_out.onnx"
    )
    assert res.folded == [] and "other consumers" in res.skipped[0].reason and res.bn_nodes_left == 1
    nodes = [
        helper.make_node("BatchNormalization", ["x", *names], ["n"]),
        helper.make_node("Conv", ["n", "cw"], ["y"], pads=[1, 1, 1, 1]),
    ]
    res = fold_onnx(
        _save(nodes, [cw, *bn_inits], [1, 3, 5, 5], [1, 3, 5, 5], tmp_path / "e.onnx"), tmp_path / "e_out.onnx"
    )
    assert res.folded == [] and "pads with zeros" in res.skipped[0].reason
    with pytest.raises(NormscopeError, match="does not exist"):
        fold_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")
