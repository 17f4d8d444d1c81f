"""The report shows the transformer panels (attention logits and log Z; max/median per block) for
the transformer fixtures, and leaves them out for a model without attention."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from normscope import load, watch
from normscope.probe import load_recipe, probe
from normscope_reports import build_report

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _panels(html: str) -> set[str]:
    return set(re.findall(r'id="panel-([a-z-]+)"', html))


@pytest.mark.parametrize("name,steps,want", [
    ("massive_activations", 8, {"attention-logit-growth", "output-logit-divergence", "massive-activations"}),
])  # fmt: skip
def test_fixture_reports_hold_the_transformer_panels(tmp_path, name, steps, want):
    run = probe(load_recipe(FIXTURES / f"{name}.py"), run_dir=tmp_path / name, steps=steps)
    html = build_report(run, out=tmp_path / "r.html").read_text()
    assert want <= _panels(html)
    assert (
        'alt="Attention logits' in html and 'alt="Massive activations' in html and 'alt="Output log-partition' in html
    )


def test_no_transformer_panels_without_attention(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))  # one output: no logits either
    with watch(model, tmp_path / "r", every=1) as scope:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            scope.step()
    html = build_report(load(tmp_path / "r"), out=tmp_path / "r.html").read_text()
    assert not _panels(html) & {"attention-logit-growth", "output-logit-divergence", "massive-activations"}
