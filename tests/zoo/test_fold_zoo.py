"""Fold zoo: every foldable BN of real architectures (transformers' ResNet, MobileNetV1/V2,
EfficientNet, RegNet, LeViT from tiny configs; test-local timm-style BatchNormAct2d, RepVGG and
MobileOne blocks) folds in PyTorch and in ONNX, on both exporters' files, with the counts asserted."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fold_models import ZOO, count_bn  # noqa: E402

from normscope.fold import export_onnx, fold_bn, fold_onnx  # noqa: E402
from normscope.fold.onnx_util import count_ops, quiet_export  # noqa: E402

pytest.importorskip("transformers")

# name: (BN modules, folded, path, {pattern: count} that must appear)
EXPECTED = {
    "hf_resnet": (19, 19, "dataflow", {"Conv2d → BatchNorm2d": 19}),
    "hf_mobilenet_v1": (27, 27, "dataflow", {"Conv2d → BatchNorm2d": 27}),
    "hf_mobilenet_v2": (52, 52, "dataflow", {"Conv2d → BatchNorm2d": 52}),
    "hf_efficientnet": (22, 22, "dataflow", {"EfficientNetDepthwiseConv2d → BatchNorm2d": 7}),
    "hf_regnet": (16, 16, "dataflow", {"Conv2d → BatchNorm2d": 16}),
    "hf_levit": (27, 27, "dataflow", {"Linear → flatten → BatchNorm1d": 22, "BatchNorm1d → Linear": 1}),
    "timm_style_bnact": (3, 3, "torch.fx", {"Conv2d → BatchNormAct2d (BN part; the rest kept)": 3}),
    "repvgg_blocks": (
        13,
        13,
        "torch.fx",
        {
            "BN identity branch + Conv2d branch → Conv2d (identity kernel)": 3,
            "Conv2d → BatchNormAct2d (BN part; the rest kept)": 10,
        },
    ),
    "mobileone_blocks": (
        13,
        13,
        "torch.fx",
        {
            "BN identity branch + Conv2d branch → Conv2d (identity kernel)": 2,
            "Conv2d → BatchNormAct2d (BN part; the rest kept)": 11,
        },
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_pytorch_fold(name):
    model, x, n_bn = ZOO[name]()
    total, folded, path, patterns = EXPECTED[name]
    assert n_bn == total
    res = fold_bn(model, x)
    assert res.tracing == path, res.untraced
    assert len(res.folded) == folded and res.all_folded, res.skipped[:3]
    counts = Counter(p.pattern for p in res.folded)
    for pattern, n in patterns.items():
        assert counts[pattern] == n, counts
    assert count_bn(res.model) == 0
    assert res.error.max_rel <= 1e-5
    with torch.no_grad():
        ref, got = model(x), res.model(x)
    ref = ref.logits if hasattr(ref, "logits") else ref
    got = got.logits if hasattr(got, "logits") else got
    assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["timm_style_bnact", "repvgg_blocks", "mobileone_blocks"])
def test_pytorch_fold_on_the_recorded_data_flow(name):
    """The same models behind a forward fx cannot trace: the data-flow path folds them too."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fold"))
    from fold_testlib import Untraceable

    model, x, _ = ZOO[name]()
    res = fold_bn(Untraceable(model), x)
    assert res.tracing == "dataflow" and res.all_folded and len(res.folded) == EXPECTED[name][1]
    assert res.error.max_rel <= 1e-5


def _export(model, x, path, dynamo):
    opts = {"optimize": False} if dynamo else {"do_constant_folding": False}
    with quiet_export():
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=18, **opts)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_onnx_fold_both_exporters(name, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, x, n_bn = ZOO[name]()
    for dynamo in (True, False):
        src = tmp_path / f"{'dynamo' if dynamo else 'legacy'}.onnx"
        _export(model, x, src, dynamo)
        assert count_ops(onnx.load(str(src))) == n_bn  # the exporter left every BN in place
        res = fold_onnx(src, tmp_path / f"folded_{src.name}")
        assert res.bn_nodes_left == 0 and len(res.folded) == n_bn, res.skipped[:2]
        assert res.verified and res.max_rel_err <= 1e-5
    out = export_onnx(model, x, tmp_path / "exported.onnx", exporter="dynamo")  # PyTorch fold, then export
    assert out.exporter == "dynamo" and out.bn_nodes_left == 0 and out.verified
    assert len(out.fold.folded) == EXPECTED[name][1]
