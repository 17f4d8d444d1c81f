"""measure_ics equals a brute-force computation of Santurkar et al.'s Definition 2.1."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from normscope import NormscopeError
from normscope.probe import measure_ics


def model_and_batch():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3),
    )  # fmt: skip
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    return model, (x, y)


LAYERS = ["0", "1", "4", "6"]  # modules with own parameters, in execution order


def brute_force(model, batch, step, seed=0):
    """Copy the model, step the layers before i, recompute — with torch.func, no normscope code."""
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    owner = {n: n.rsplit(".", 1)[0] for n in names}
    w_t = {n: p.detach().clone() for n, p in model.named_parameters()}

    def grad_at(params):
        m = copy.deepcopy(model)  # fresh BN buffers each time
        ps = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss = nn.functional.cross_entropy(functional_call(m, ps, (x,)), y)
        gs = torch.autograd.grad(loss, [ps[n] for n in names])
        return dict(zip(names, gs))

    g = grad_at(w_t)
    w_next = {n: step(w_t[n], g[n]) for n in names}
    out = {}
    for i, layer in enumerate(LAYERS):
        mixed = {n: (w_next[n] if owner[n] in LAYERS[:i] else w_t[n]) for n in names}
        gp = grad_at(mixed)
        mine = [n for n in names if owner[n] == layer]
        a = torch.cat([g[n].reshape(-1) for n in mine]).double()
        b = torch.cat([gp[n].reshape(-1) for n in mine]).double()
        out[layer] = (float((a - b).norm()), float(a @ b / (a.norm() * b.norm())), float(a.norm()))
    return out


def test_ics_equals_brute_force_sgd():
    model, batch = model_and_batch()
    before = copy.deepcopy(model.state_dict())
    df = measure_ics(model, nn.functional.cross_entropy, batch, 0.5)
    want = brute_force(model, batch, lambda w, g: w - 0.5 * g)
    assert df.layer.tolist() == LAYERS
    for r in df.itertuples():
        d, c, gn = want[r.layer]
        assert r.diff_norm == pytest.approx(d, rel=1e-4, abs=1e-7)
        assert r.cos == pytest.approx(c, rel=1e-5)
        assert r.g_norm == pytest.approx(gn, rel=1e-5)
    # the first layer has no earlier layer: G' = G
    assert df.diff_norm.iloc[0] == pytest.approx(0.0, abs=1e-7) and df.cos.iloc[0] == pytest.approx(1.0)
    # the model itself is untouched (weights and BN buffers)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ics_equals_brute_force_adam_factory_and_layer_subset():
    model, batch = model_and_batch()
    lr, eps = 1e-2, 1e-8
    df = measure_ics(model, nn.functional.cross_entropy, batch, lambda ps: torch.optim.Adam(ps, lr=lr, eps=eps),
                     layers=["4", "6"])  # fmt: skip
    # Adam's first step: m̂ = g, v̂ = g², update = lr·g/(|g| + eps)
    want = brute_force(model, batch, lambda w, g: w - lr * g / (g.abs() + eps))
    assert df.layer.tolist() == ["4", "6"] and df.order.tolist() == [2, 3]
    for r in df.itertuples():
        assert r.diff_norm == pytest.approx(want[r.layer][0], rel=1e-4)
        assert r.cos == pytest.approx(want[r.layer][1], rel=1e-5)
    assert np.all(df.diff_norm > 0)


def test_ics_bad_input():
    model, batch = model_and_batch()
    with pytest.raises(NormscopeError, match="no trainable parameters of their own"):
        measure_ics(model, nn.functional.cross_entropy, batch, 0.1, layers=["2"])
    with pytest.raises(NormscopeError, match=r"\(inputs, targets\) pair"):
        measure_ics(model, nn.functional.cross_entropy, batch[0], 0.1)
    with pytest.raises(NormscopeError, match="learning rate or a factory"):
        measure_ics(model, nn.functional.cross_entropy, batch, "adam")
