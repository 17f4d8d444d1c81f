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


def test_probe_model_wrong_input_shape_is_one_line_error(tmp_path):
    """Regression: a forward that raised on the synthetic input surfaced torch's own traceback."""
    with pytest.raises(
        NormscopeError, match=r"raised on standard-normal inputs of shape \(4, 3\).*check --input-shape"
    ) as e:
        probe_model(nn.Linear(2, 2), (4, 3), run_dir=tmp_path / "a")
    assert "\n" not in str(e.value)
    # an embedding model on a shape no embedding path accepts either: both attempts are named
    bad = nn.Sequential(nn.Embedding(10, 4), nn.Linear(5, 2))
    with pytest.raises(NormscopeError, match=r"and on token ids below 10") as e:
        probe_model(bad, (4, 3), run_dir=tmp_path / "b")
    assert "\n" not in str(e.value)


def test_probe_model_feeds_token_ids_to_a_model_that_embeds_its_input(tmp_path):
    """A language model raises on float inputs: probe_model draws token ids below its first
    embedding's size (the token table), so init diagnostics run on it too."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(50, 16)
            self.pos = nn.Embedding(8, 16)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 50))

        def forward(self, ids):
            seen.append(ids)
            return self.mlp(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))

    seen = []
    run = probe_model(LM(), (4, 8), steps=3, run_dir=tmp_path / "lm")
    assert read_probe(run.run_dir)["synthetic_inputs"] == "token ids uniform in [0, 50)"
    real = [x for x in seen if isinstance(x, torch.Tensor)]  # (not the fx tracer's proxies)
    ids = [x for x in real if x.dtype == torch.int64]
    assert len(ids) == len(real) - 1 >= 3  # every forward but the first attempt (floats) got token ids
    assert all(x.shape == (4, 8) and 0 <= int(x.min()) and int(x.max()) < 50 for x in ids)
    assert len(set(run.stats.step)) == 3 and {"mlp.0", "mlp.2"} <= set(run.stats.layer)
    a = analyze_full(run)
    assert not [f for f in a.findings if f.severity != "info"]


def test_probe_model_leaves_the_callers_random_state_alone(tmp_path):
    """Regression: the input-kind attempt drew its inputs from torch's global generator."""
    model = nn.Sequential(nn.Embedding(20, 8), nn.Dropout(0.1), nn.Linear(8, 4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    probe_model(model, (4, 6), steps=2, run_dir=tmp_path / "lm")
    assert torch.equal(torch.get_rng_state(), before)
