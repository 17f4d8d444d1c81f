"""bn-momentum on real runs: the momentum each BatchNorm was built with, recorded by watch() (no model
or probe needed to read it back), and named as the cause where running statistics are stale."""

import warnings

import pytest
import torch
from analyze_testlib import FIXTURES, fixture_module
from torch import nn

import normscope
from normscope import load, watch
from normscope.analyze import analyze_full


def test_watch_records_each_batchnorm_momentum_and_the_check_reads_it_back(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.99), nn.ReLU(),  # Keras's 0.99, ported as is
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),  # cumulative average: fine
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=0.9, track_running_stats=False),  # batch stats always
        nn.Flatten(), nn.LazyLinear(2),
    )  # fmt: skip
    model(torch.randn(2, 3, 10, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, tmp_path / "r", every=1):
        for _ in range(3):
            loss = model(torch.randn(8, 3, 10, 10)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = load(tmp_path / "r")
    mods = run.modules
    assert (mods["1"]["momentum"], mods["4"]["momentum"], mods["7"]["track_running_stats"]) == (0.99, None, False)
    (f,) = [f for f in analyze_full(run).findings if f.check == "bn-momentum"]  # from meta.json alone
    assert f.severity == "warning" and f.layer == "1" and [x["layer"] for x in f.evidence["layers"]] == ["1"]
    assert "momentum=0.01 in PyTorch" in f.message and f.evidence["bn_layers"] == 2
    (g,) = [f for f in analyze_full(run, model=model).findings if f.check == "bn-momentum"]  # the live model agrees
    assert g.evidence == f.evidence


def test_stale_statistics_name_the_inverted_momentum_as_their_cause(tmp_path):
    """The stale_running_stats fixture (eval data with another contrast) with Keras's momentum 0.9:
    the staleness warning says the running statistics are the last batch's and points to bn-momentum."""
    r = fixture_module(FIXTURES / "stale_running_stats.py").recipe()
    for m in r.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = normscope.probe(r, run_dir=tmp_path / "s")
    a = analyze_full(run)
    stale = [f for f in a.findings if f.check == "stale-running-stats" and f.severity == "warning"]
    assert stale and all(f.evidence["momentum_inverted"] == pytest.approx(0.9) for f in stale)
    assert "last batch's statistics alone (bn-momentum" in stale[0].message
    assert {f.check for f in a.findings if f.severity != "info"} == {"stale-running-stats", "bn-momentum"}


def test_inference_only_runs_update_no_running_statistics_and_are_not_reported(tmp_path):
    """Review regression: an eval-only, no-grad run of a model built with momentum 0.99 warned that
    evaluation normalises with one batch's noise; its running statistics never change in that run."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.99), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 2)).eval()  # fmt: skip
    with watch(net, tmp_path / "r", every=1) as scope:
        for _ in range(4):
            with torch.no_grad():
                net(torch.randn(16, 3, 8, 8))
            scope.step()
    a = analyze_full(load(tmp_path / "r"))
    assert not [f for f in a.findings if f.check == "bn-momentum"]
    (skip,) = [s for s in a.skipped if s.check == "bn-momentum"]
    assert skip.reason.startswith("no BatchNorm updated its running statistics")
