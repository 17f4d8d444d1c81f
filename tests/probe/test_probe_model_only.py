"""probe_model(): initialisation-time diagnostics from a model (or factory) and an input shape."""

import models
import numpy as np
import pytest
import torch
from torch import nn

from normscope import NormscopeError
from normscope.analyze import analyze_full, signal_propagation
from normscope.probe import probe_model
from normscope.store.sidecars import read_probe


def test_dead_at_init_and_training_checks_skipped(tmp_path):
    def factory():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        with torch.no_grad():
            m[0].bias[:32] = -20.0  # half the units can never fire on N(0, 1) inputs
        return m

    run = probe_model(factory, (64, 16), steps=4, run_dir=tmp_path / "r")
    a = analyze_full(run)
    (f,) = [f for f in a.findings if f.check == "dead-units"]
    assert f.evidence["born_dead"] == 32 and f.severity == "error"
    skipped = {s.check: s.reason for s in a.skipped}
    for cid in ("update-ratio", "unnormalized-inputs", "stale-running-stats", "overfitting", "small-batch-bn"):
        assert "model-only" in skipped[cid]
    pr = read_probe(run.run_dir)
    assert pr["mode"] == "model" and pr["input_shape"] == [64, 16]
    # weights stay at initialisation (lr 0)
    assert run.params.update_norm.max() == 0.0


def test_saturation_and_vanishing_at_init(tmp_path):
    def factory():
        torch.manual_seed(0)
        layers = []
        for _ in range(10):
            lin = nn.Linear(32, 32)
            nn.init.normal_(lin.weight, 0, 4 / 32**0.5)
            nn.init.normal_(lin.bias, 0, 4.0)
            layers += [lin, nn.Sigmoid()]
        return nn.Sequential(*layers, nn.Linear(32, 1))

    a = analyze_full(probe_model(factory, (128, 32), steps=3, run_dir=tmp_path / "s"))
    checks = {f.check for f in a.findings if f.severity != "info"}
    assert {"saturation", "vanishing-gradients"} <= checks


def test_signal_propagation_at_init_for_a_resnet(tmp_path):
    torch.manual_seed(0)
    model = models.TinyResNet()
    run = probe_model(model, (8, 3, 8, 8), steps=2, run_dir=tmp_path / "res")
    sp = signal_propagation(run)
    assert sp.layer.tolist() == ["layer1", "layer2"] and (sp.kind == "block").all() and (sp.when == "init").all()
    # brute force: the block outputs of the same forward (train mode, first synthetic batch)
    x = torch.randn((8, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    got = {}

    def keep(n):
        def hook(m, a, o):
            got[n] = o.detach().double().clone()

        return hook

    hs = [getattr(model, n).register_forward_hook(keep(n)) for n in ("layer1", "layer2")]
    with torch.no_grad():
        model.train()
        model(x)
    for h in hs:
        h.remove()
    for r in sp.itertuples():
        t = got[r.layer].transpose(0, 1).flatten(1)
        assert r.avg_sq_mean == pytest.approx(float((t.mean(1) ** 2).mean()), rel=1e-9)
        assert r.avg_var == pytest.approx(float(t.var(1, unbiased=False).mean()), rel=1e-9)
        assert np.isfinite(r.branch_var) and r.branch_var > 0


def test_probe_model_errors(tmp_path):
    with pytest.raises(NormscopeError, match="nn.Module or a factory"):
        probe_model(3, (2, 2))
    with pytest.raises(NormscopeError, match="factory returned int"):
        probe_model(lambda: 3, (2, 2))
    with pytest.raises(NormscopeError, match="input_shape must be"):
        probe_model(nn.Linear(2, 2), "2x2")
    with pytest.raises(NormscopeError, match="input_shape must be positive"):
        probe_model(nn.Linear(2, 2), (0, 2))
