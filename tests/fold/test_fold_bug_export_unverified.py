"""Bug: ``export_onnx`` said ``verified=False`` and wrote the file anyway. Now a file that fails
verification is not written (``VerificationError``, a NormscopeError with one line saying what
and what to do), unless ``force=True`` / ``--force``; the CLI exits 1."""

import pytest
import torch
from fold_testlib import randomize_all
from torch import nn

from normscope.errors import NormscopeError
from normscope.fold import VerificationError, export_onnx

pytest.importorskip("onnxruntime")


class Noisy(nn.Module):
    """Exports fine, but its output depends on a random draw that onnxruntime does not repeat."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.rand_like(x[:, :1])


def test_failed_verification_writes_nothing(tmp_path):
    model = randomize_all(Noisy(), "neg_gamma")
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="nothing written") as info:
        export_onnx(model, torch.randn(1, 3, 4, 4), out, exporter="torchscript")
    assert isinstance(info.value, NormscopeError) and "\n" not in str(info.value) and "--force" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_force_writes_and_says_so(tmp_path):
    model = randomize_all(Noisy(), "neg_gamma")
    out = tmp_path / "m.onnx"
    res = export_onnx(model, torch.randn(1, 3, 4, 4), out, exporter="torchscript", force=True)
    assert out.is_file() and res.verified is False and any("force=True" in n for n in res.notes)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_verified_export_is_written_in_place(tmp_path):
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "neg_gamma")
    res = export_onnx(model, torch.randn(1, 3, 4, 4), tmp_path / "ok.onnx", exporter="torchscript")
    assert res.verified and [p.name for p in tmp_path.iterdir()] == ["ok.onnx"]


def test_cli_refuses_without_force(tmp_path):
    from typer.testing import CliRunner

    from normscope_cli.app import app

    src = tmp_path / "noisy.py"
    src.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Noisy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 1)\n\n"
        "    def forward(self, x):\n        return self.conv(x) + torch.rand_like(x[:, :1])\n\n"
        "def model():\n    return Noisy()\n"
    )
    out = tmp_path / "m.onnx"
    runner = CliRunner()
    args = ["fold", str(src), "-s", "1,3,4,4", "-o", str(out), "--exporter", "torchscript"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "nothing written" in res.output and not out.exists()
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 1 and out.is_file()
