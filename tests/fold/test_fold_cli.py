"""``normscope fold`` through a tiny typer app (cli/app.py wires the real one)."""

import json
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.fold_cmd import parse_shape, register

FIXTURE = str(Path(__file__).resolve().parents[2] / "fixtures" / "deploy_models.py")


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """test app"""

    return app


def run(app, *args):
    return CliRunner().invoke(app, ["fold", *args])


def test_table_with_export(app, tmp_path):
    out = tmp_path / "m.onnx"
    res = run(app, FIXTURE, "--input-shape", "1,3,32,32", "-o", str(out), "--exporter", "torchscript")
    assert res.exit_code == 0, res.stderr
    assert "Folded (9)" in res.stdout and "BatchNormalization nodes left: 0" in res.stdout
    assert "OK" in res.stdout and out.is_file()


def test_json_only_on_stdout(app):
    res = run(app, f"{FIXTURE}:mobilenet_v2_tiny", "-s", "2,3,32,32", "--format", "json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["fold"]["tracing"] == "torch.fx"
    assert len(report["fold"]["folded"]) == 16 and report["fold"]["skipped"] == []
    assert report["fold"]["error"]["max_rel"] <= 1e-6


def test_skipped_pairs_have_reasons_and_no_verify(app, tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        def build_model():
            print("noise on stdout")  # must not break --format json
            return nn.Sequential(nn.Linear(10, 5), nn.BatchNorm2d(5)).eval()
    """)
    )
    res = run(app, str(src), "-s", "2,5,3,10", "--format", "json", "--no-verify")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["fold"]["folded"] == [] and "axis" in report["fold"]["skipped"][0]["reason"]
    assert report["fold"]["error"] is None
    res = run(app, str(src), "-s", "2,5,3,10")
    assert res.exit_code == 0 and "Skipped (1)" in res.stdout


def test_recalibrate_with_recipe(app, tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        from normscope import Recipe
        def recipe():
            g = torch.Generator().manual_seed(0)
            data = [(torch.randn(4, 3, 32, 32, generator=g), torch.zeros(4)) for _ in range(3)]
            return Recipe(nn.Identity(), data, nn.functional.mse_loss)
    """)
    )
    res = run(app, FIXTURE, "-s", "1,3,32,32", "--recalibrate", str(recipe), "--format", "json")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)["recalibration"]
    assert rec["batches"] == 3 and rec["samples"] == 12 and len(rec["bns"]) == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.py", "-s", "1,3"], "does not exist"),
        (["missing_dir/model.py:f", "-s", "1,3"], "does not exist"),
        ([f"{FIXTURE}:nope", "-s", "1,3"], "has no function nope"),
        ([FIXTURE, "-s", "1,x3"], "bad --input-shape"),
        ([FIXTURE, "-s", "1,3,0"], "bad --input-shape"),
        ([FIXTURE, "-s", "1,3,8"], "fails on the example inputs"),
        ([FIXTURE, "-s", "1,3,32,32", "--format", "xml"], "--format"),
        ([f"{FIXTURE}:conv_bn", "-s", "1,3,32,32"], "failed"),
        (["no_such_module_xyz:f", "-s", "1"], "could not be imported"),
    ],
)
def test_bad_input_exits_2_with_one_line(app, args, message):
    res = run(app, *args)
    assert res.exit_code == 2
    assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_not_a_module(app, tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def model():\n    return 42\n")
    res = run(app, str(src), "-s", "1")
    assert res.exit_code == 2 and "not a torch.nn.Module" in res.stderr


def test_parse_shape():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("1x3x8") == (1, 3, 8)
