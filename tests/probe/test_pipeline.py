"""normscope.inspect: the library function behind `normscope inspect` (probe → fold → analyze → report)."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import normscope
from normscope import Inspection, NormscopeError, Recipe

RECIPE = """
import torch
from torch import nn
import normscope

def recipe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(4)]
    return normscope.Recipe(model, batches, nn.functional.cross_entropy,
                            optimizer=torch.optim.Adam(model.parameters(), 1e-3), steps=6, name="tiny")
"""


@pytest.fixture
def recipe_file(tmp_path):
    p = tmp_path / "tiny_recipe.py"
    p.write_text(RECIPE)
    return p


def test_inspect_recipe_probes_folds_analyzes_and_reports(recipe_file, tmp_path):
    seen = []
    res = normscope.inspect(str(recipe_file), run_dir=tmp_path / "run", progress=lambda s, n, loss: seen.append(s))
    assert isinstance(res, Inspection) and seen == list(range(6))
    assert res.report == tmp_path / "run" / "report.html" and res.report.is_file()
    assert res.fold is not None and res.run.fold == res.fold  # fold.json written through the store
    assert {f["bn"] for f in res.fold["folded"]} == {"1", "5"}
    doc = res.to_dict()
    assert doc["run_dir"] == str(tmp_path / "run") and doc["summary"] == res.analysis.counts()
    assert "dropout-bn-variance-shift" in {f.check for f in res.findings}


def test_cli_prints_what_the_library_returns(recipe_file, tmp_path):
    from normscope_cli.app import app

    lib = normscope.inspect(str(recipe_file), run_dir=tmp_path / "lib", report=False).to_dict()
    out = CliRunner().invoke(app, ["inspect", str(recipe_file), "--out", str(tmp_path / "cli"), "--format", "json",
                                   "--no-report"])  # fmt: skip
    assert out.exit_code == 0, out.output
    cli = json.loads(out.stdout)
    strip = lambda d: [(f["check"], f["severity"], f["layer"], f["message"]) for f in d["findings"]]  # noqa: E731
    assert strip(cli) == strip(lib) and cli["summary"] == lib["summary"] and cli["checks_run"] == lib["checks_run"]
    assert cli["report"] is None and lib["report"] is None


def test_inspect_run_dir_and_recipe_object_and_model_factory(tmp_path):
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [(torch.randn(16, 5), torch.randint(0, 2, (16,))) for _ in range(3)]
    first = normscope.inspect(Recipe(model, batches, nn.functional.cross_entropy, steps=3), run_dir=tmp_path / "a",
                              report=False)  # fmt: skip
    again = normscope.inspect(tmp_path / "a", report=False)
    assert again.model is None and [f.to_dict() for f in again.findings] == [f.to_dict() for f in first.findings]
    m = normscope.inspect(lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh()), input_shape="4,6", run_dir=tmp_path / "m",
                          report=False)  # fmt: skip
    assert m.run.meta["name"] and len(m.run.stats)


def test_bad_config_fails_before_training(recipe_file, tmp_path):
    with pytest.raises(NormscopeError, match="unknown check"):
        normscope.inspect(str(recipe_file), run_dir=tmp_path / "x", config={"nope": {"warn": 1}})
    assert not (tmp_path / "x").exists()
    with pytest.raises(NormscopeError, match="bad input shape"):
        normscope.inspect(lambda: nn.Linear(2, 2), input_shape="0,2")
