"""TensorBoard export: event files read back with TensorBoard's own reader."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from normscope import load, watch
from normscope_cli.app import app


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tb") / "run"
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, path, every=2) as scope:
        for _ in range(6):
            loss = model(torch.randn(16, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss.item())
    return path


def test_export_reads_back(run_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = CliRunner().invoke(app, ["export-tensorboard", str(run_dir), str(tmp_path / "tb")])
    assert r.exit_code == 0, r.stderr
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    run = load(run_dir)
    s = run.stats[(run.stats.layer == "1") & (run.stats.output == "")].sort_values("step")
    got = [(e.step, e.value) for e in acc.Scalars("act/1/std")]
    assert [g[0] for g in got] == s.step.tolist() == [0, 2, 4]
    np.testing.assert_allclose([g[1] for g in got], s["std"], rtol=1e-6)
    dead = [e.value for e in acc.Scalars("act/1/dead_fraction")]
    np.testing.assert_allclose(dead, [np.mean(a == 0) for a in s.active])
    assert "act/3/frac_sat" in tags["scalars"] and "act/1/frac_sat" not in tags["scalars"]
    loss = [e.value for e in acc.Scalars("train/loss")]
    np.testing.assert_allclose(loss, run.scalars.value, rtol=1e-6)
    g = run.grads[run.grads.layer == "2"].sort_values("step")
    np.testing.assert_allclose([e.value for e in acc.Scalars("grad/2/rms")], g.rms, rtol=1e-6)
    p = run.params[run.params.param == "0.weight"].sort_values("step")
    np.testing.assert_allclose(
        [e.value for e in acc.Scalars("param/0.weight/update_ratio")], p.update_norm / p.norm, rtol=1e-6
    )
    h = acc.Histograms("act/3")
    assert len(h) == 3
    want = run.stats[(run.stats.layer == "3")].sort_values("step")["hist"].iloc[0]
    assert h[0].histogram_value.num == want.sum()
    assert list(h[0].histogram_value.bucket) == want.astype(float).tolist()


def test_export_errors_one_line(tmp_path):
    r = CliRunner().invoke(app, ["export-tensorboard", str(tmp_path / "missing"), str(tmp_path / "tb")])
    assert r.exit_code == 2 and r.stderr.startswith("normscope: error:") and "does not exist" in r.stderr
