"""Signal propagation and covariate-shift series against brute force on captured activations."""

import numpy as np
import pytest
import torch
from analyze_testlib import capture
from torch import nn

from normscope import NormscopeError, watch
from normscope.analyze import covariate_shift, signal_propagation


def chan(t: torch.Tensor, axis: int):
    t = t.double().movedim(axis, 0).reshape(t.shape[axis], -1)
    return t.mean(1).numpy(), t.var(1, unbiased=False).numpy()


@pytest.fixture
def conv_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3)
    )
    store: dict = {}
    capture(model, ["0", "2", "4"], store)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(0)
    with watch(model, tmp_path / "r", every=1):
        for _ in range(12):
            x = torch.randn(16, 2, 4, 4, generator=g) * 1.5 + 0.5
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tmp_path / "r", store


def test_signal_propagation_layers_equal_brute_force(conv_run):
    run, store = conv_run
    sp = signal_propagation(run)  # no probe file: every hooked layer
    assert set(sp.kind) == {"layer"} and set(sp.source) == {"stats"}
    for name, axis in (("0", 1), ("2", 1), ("4", -1)):
        d = sp[sp.layer == name].sort_values("step")
        assert d.step.tolist() == list(range(12))
        for step, t in enumerate(store[name]):
            m, v = chan(t, axis)
            assert d.avg_sq_mean.iloc[step] == pytest.approx(float(np.mean(m * m)), rel=1e-4, abs=1e-9)
            assert d.avg_var.iloc[step] == pytest.approx(float(np.mean(v)), rel=1e-4)
    with pytest.raises(NormscopeError, match="level must be"):
        signal_propagation(run, level="nope")


def test_covariate_shift_series_equals_formula_on_captured_moments(conv_run):
    run, store = conv_run
    lag = 3
    df = covariate_shift(run, lag=lag)
    d = df[(df.layer == "0") & (df.output == "")].sort_values("step")
    assert d.step.tolist() == list(range(lag, 12))  # t − k must exist
    for r in d.itertuples():
        assert r.prev_step == r.step - lag
        m1, v1 = chan(store["0"][r.prev_step], 1)
        m2, v2 = chan(store["0"][r.step], 1)
        kl = np.mean(((v1 - v2) ** 2 + (v1 + v2) * (m1 - m2) ** 2) / (2 * v1 * v2))
        w2 = np.mean(((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2) / ((v1 + v2) / 2))
        assert r.sym_kl == pytest.approx(kl, rel=1e-3) and r.w2 == pytest.approx(w2, rel=1e-3)
    # the BN's input is a series of its own
    assert len(df[(df.layer == "1") & (df.output == "input")]) == 12 - lag
