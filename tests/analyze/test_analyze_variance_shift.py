"""dropout → BN: the measured variance shift equals Li et al.'s closed form
Δ(q) = v / ((c² + v)/q − c²) within 5 %, for retain probabilities q and input means c."""

import pytest
import torch
from torch import nn

from normscope.analyze import analyze_full
from normscope.analyze.formulas import shift_factor, variance_shift_closed_form
from normscope.probe import Recipe, probe


def synthetic_recipe(
    q: float, c: float, v: float, channels: int = 16, n: int = 4096, batch: int = 256, steps: int = 64
):
    g = torch.Generator().manual_seed(1)
    x = c + v**0.5 * torch.randn(n, channels, generator=g)
    y = torch.zeros(n, 1)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    # momentum=None: BN's running variance is the plain average over all training batches
    model = nn.Sequential(nn.Dropout(1 - q), nn.BatchNorm1d(channels, momentum=None), nn.Linear(channels, 1))
    return Recipe(model, batches, nn.functional.mse_loss, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                  steps=steps)  # fmt: skip


@pytest.mark.parametrize("q", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("c", [0.0, 1.5])
def test_measured_shift_matches_closed_form(tmp_path, q, c):
    v = 0.8
    run = probe(synthetic_recipe(q, c, v), run_dir=tmp_path / "r", every=4)
    (f,) = [f for f in analyze_full(run).findings if f.check == "dropout-bn-variance-shift"]
    want = variance_shift_closed_form(q, c, v)
    assert f.evidence["var_ratio_eval_over_running"] == pytest.approx(want, rel=0.05)
    assert f.evidence["measured_shift"] == pytest.approx(shift_factor(want), rel=0.05)
    # the prediction from the dropout layer's recorded train-mode moments agrees too
    assert f.evidence["predicted_delta"] == pytest.approx(want, rel=0.05)
    assert f.severity == ("warning" if shift_factor(want) > 1.1 else "info")


def test_structural_only_without_probe_uses_zero_mean_prediction(tmp_path):
    """With just a watched run and the model, the check still finds the structure (Δ = q)."""
    from normscope import watch

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    with watch(model, tmp_path / "w", every=1) as scope:
        model(torch.randn(32, 4)).sum().backward()
        scope.step()
    (f,) = [f for f in analyze_full(tmp_path / "w", model=model).findings if f.check == "dropout-bn-variance-shift"]
    assert f.layer == "3" and f.evidence["dropouts"] == [{"module": "1", "p": 0.3, "direct": False}]
    assert f.evidence["graph"] == "fx" and "measured_shift" not in f.evidence
    assert f.evidence["predicted_shift"] == pytest.approx(1 / 0.7)
    # regression: the one-module-per-check split renamed the thresholds argument inside this message
    assert "(dropout p=0.3)" in f.message


def test_no_finding_when_dropout_is_after_the_last_bn(tmp_path):
    from normscope import watch

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    with watch(model, tmp_path / "w", every=1) as scope:
        model(torch.randn(32, 4)).sum().backward()
        scope.step()
    a = analyze_full(tmp_path / "w", model=model)
    assert not [f for f in a.findings if f.check == "dropout-bn-variance-shift"]
    assert "dropout-bn-variance-shift" in a.checks_run
