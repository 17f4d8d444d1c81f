"""vanishing/exploding-gradients: size-independent depth profiles against brute force.

vanishing-gradients reads the relative weight gradient ‖∇W‖/‖W‖ per layer, exploding-gradients the
whole-tensor norm of the gradient w.r.t. each layer's output; both compare the medians of the
first and last eighth of the layers. A pooled CNN, whose per-element gradient RMS shrinks as 1/(H·W) by
construction, must not look like vanishing gradients (regression: the RMS measure fired on it).
"""

import numpy as np
import pytest
import torch
from analyze_testlib import capture
from torch import nn

from normscope import load, watch
from normscope.analyze import analyze_full

STEPS = 6
WINDOW = slice(3, 6)  # last half of 6 sampled steps


def _train(model, run_dir, make_loss):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # fixed weights: the profile is the init's
    wgrads = {n: [] for n, _ in model.named_parameters()}
    with watch(model, run_dir, every=1):
        for _ in range(STEPS):
            loss = make_loss()
            opt.zero_grad()
            loss.backward()
            for n, p in model.named_parameters():
                wgrads[n].append(float(p.grad.double().norm()))
            opt.step()
    return analyze_full(run_dir), wgrads


def _ends(values):
    k = max(1, len(values) // 8)
    return np.median(values[:k]) / np.median(values[-k:])


def test_exploding_profile_is_the_output_gradient_norm(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16) for _ in range(9)]
    for lin in layers:
        nn.init.orthogonal_(lin.weight, gain=2.5)
        nn.init.zeros_(lin.bias)
    model = nn.Sequential(*layers)
    names = [str(i) for i in range(9)]
    store, grads = {}, {}
    capture(model, names, store, grads)
    a, _ = _train(model, tmp_path / "g", lambda: model(torch.randn(32, 16)).pow(2).mean())
    norms = {n: np.median([float(g.double().norm()) for _, g in sorted(grads[n].items())][WINDOW]) for n in names}
    want = _ends(np.array([norms[n] for n in names]))
    (f,) = [f for f in a.findings if f.check in ("exploding-gradients", "vanishing-gradients")]
    assert f.check == "exploding-gradients" and f.layer == "0" and f.step == (3, 5) and want > 1e3
    assert f.evidence["ratio_first_over_last"] == pytest.approx(want, rel=1e-5)
    per = {r["layer"]: r["value"] for r in f.evidence["per_layer"]}
    assert per == pytest.approx(norms, rel=1e-5)
    assert f.evidence["backward_gain"][0] == pytest.approx(per["0"] / per["1"])


def test_vanishing_profile_is_the_relative_weight_gradient(tmp_path):
    torch.manual_seed(0)
    mods = []
    for _ in range(9):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, 0.0, 1.0 / 4)
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.Sigmoid()]
    model = nn.Sequential(*mods)
    a, wgrads = _train(model, tmp_path / "v", lambda: (model(torch.randn(32, 16)) - 1).pow(2).mean())
    lin_names = [str(i) for i in range(0, 18, 2)]
    rho = np.array([np.median(wgrads[f"{n}.weight"][WINDOW]) / float(model[int(n)].weight.double().norm())
                    for n in lin_names])  # fmt: skip
    want = _ends(rho)
    found = {f.check: f for f in a.findings}
    f = found["vanishing-gradients"]
    assert want < 1e-3 and f.layer == "0" and f.evidence["ratio_first_over_last"] == pytest.approx(want, rel=1e-5)
    per = {r["layer"]: r["value"] for r in f.evidence["per_layer"]}
    assert [per[n] for n in lin_names] == pytest.approx(rho.tolist(), rel=1e-5)
    assert f.evidence["measure"].startswith("relative weight gradient")


def test_balanced_deep_linear_network_fires_neither(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16) for _ in range(9)]
    for lin in layers:
        nn.init.orthogonal_(lin.weight, gain=1.0)
    model = nn.Sequential(*layers)
    a, _ = _train(model, tmp_path / "h", lambda: model(torch.randn(32, 16)).pow(2).mean())
    assert not [f for f in a.findings if f.check in ("exploding-gradients", "vanishing-gradients")]


@pytest.mark.parametrize("size", [32, 64])
def test_pooled_cnn_is_not_vanishing(tmp_path, size):
    """Regression: a healthy conv-BN-ReLU CNN with global average pooling (the RMS measure: 6.4e-4 at 32×32)."""
    torch.manual_seed(0)
    blocks = []
    c = 3
    for w in (16, 16, 32, 32):
        blocks += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    y = torch.randint(0, 10, (16,))
    a, _ = _train(model, tmp_path / "p", lambda: nn.functional.cross_entropy(model(torch.randn(16, 3, size, size)), y))
    g = load(tmp_path / "p").grads
    rms = g[g.output == ""].groupby("layer").rms.median()
    assert rms["0"] / rms["14"] < 1e-3  # the old per-element measure would have fired
    assert not [f for f in a.findings if f.check == "vanishing-gradients"]


def test_zero_initialised_head_is_left_out_of_the_relative_gradient(tmp_path):
    """A zero-init head has ‖∇W‖/‖W‖ → ∞ after one step: it must not make the network look vanishing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    nn.init.zeros_(model[4].weight)
    nn.init.zeros_(model[4].bias)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with watch(model, tmp_path / "z", every=1):
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 4, (32,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    from normscope.analyze.checks._gradflow import weight_profile
    from normscope.analyze.context import Context

    prof = weight_profile(Context(load(tmp_path / "z")), 0.5)
    assert "4.weight" not in prof["params"] and prof["left_out_near_zero_init"] == ["4.bias", "4.weight"]
    assert prof["left_out_gated"] == []  # the head gates every layer alike: ρ's ratio is unchanged
    assert not [f for f in analyze_full(tmp_path / "z").findings if f.check == "vanishing-gradients"]


class _LoRA(nn.Module):
    """A frozen layer plus a trainable low-rank update whose B starts at zero (Hu et al. 2021, LoRA)."""

    def __init__(self, d: int, r: int = 2):
        super().__init__()
        self.base = nn.Linear(d, d).requires_grad_(False)
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return x + torch.relu(self.base(x)) + 2.0 * self.lora_B(self.lora_A(x))


def _lora_run(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(*[_LoRA(16) for _ in range(4)], nn.Linear(16, 4))
    nn.init.normal_(model[4].weight, 0.0, 0.02)  # transformers' head init; LoRA's usual lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 3e-4, weight_decay=0.0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with watch(model, run_dir, every=1):
        for _ in range(12):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.mark.parametrize("graph", ["execution-order", "fx"])
def test_lora_adapters_gated_by_their_zero_init_b_are_not_vanishing(tmp_path, graph):
    """Regression: LoRA fine-tuning warned 'gradients vanish along depth' (zoo BERT 2.5e-4, Swin 1.1e-4):
    ∇A = Bᵀ(∂L/∂h)xᵀ grows with B from zero, so ρ_A measured the adapters' age against a head
    trained from scratch. A layer feeding only a near-zero-init layer is left out of ρ."""
    from normscope.analyze.checks._gradflow import weight_profile
    from normscope.analyze.context import Context

    model = _lora_run(tmp_path / "l")
    run = load(tmp_path / "l")
    ctx = Context(run, model=model if graph == "fx" else None)
    assert ctx.graph.source == graph
    gated = {f"{i}.lora_A": f"{i}.lora_B" for i in range(4)}
    p = ctx.params
    head = p[(p.param == "4.weight") & (p.step >= 6)]
    rho_head = np.median(head.grad_norm / head.norm)
    adapters = p[p.param.str.endswith("lora_A.weight") & (p.step >= 6)]
    rho_a = [np.median(d.grad_norm / d.norm) for _, d in adapters.groupby("param")]
    assert max(rho_a) / rho_head < 1e-3  # what the check read before: a 'vanishing' ratio
    with pytest.raises(Exception, match="left out: 4 layers gated by a weight that started near zero"):
        weight_profile(ctx, 0.5)  # the head alone is left: no depth to judge
    a = analyze_full(run, model=model if graph == "fx" else None)
    assert not [f for f in a.findings if f.check == "vanishing-gradients"]
    skip = [s for s in a.skipped if s.check == "vanishing-gradients"]
    assert skip and "gated" in skip[0].reason
    from normscope.analyze.checks._gradflow import gated_by_near_zero_init, near_zero_init

    assert gated_by_near_zero_init(ctx, near_zero_init(ctx)) == gated


class _Conditioned(nn.Module):
    """An encoder plus a zero-init conditioning branch, summed before the head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.cond = nn.Linear(4, 16)
        nn.init.zeros_(self.cond.weight)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.enc(x[:, :8]) + self.cond(x[:, 8:]))


class _OnePlusNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) · (1 + w), w initialised at 0 — it passes the signal."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("case", ["branch", "one-plus-norm"])
def test_zero_init_weights_that_gate_nothing_gate_no_layer(tmp_path, case):
    """Review regressions: on the execution-order chain a layer run just before an unrelated zero-init
    branch read as gated by it; and a (1 + w) norm with w = 0 (Gemma: its o_proj/down_proj and the
    embedding were left out) read as a gate. Both are open paths: nothing is left out."""
    from normscope.analyze.checks._gradflow import gated_by_near_zero_init, near_zero_init
    from normscope.analyze.context import Context

    torch.manual_seed(0)
    if case == "branch":
        model, width = _Conditioned(), 12
    else:
        model, width = nn.Sequential(nn.Linear(8, 16), _OnePlusNorm(16), nn.Linear(16, 16), _OnePlusNorm(16),
                                     nn.Linear(16, 2)), 8  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, tmp_path / "r", every=1):
        for _ in range(3):
            loss = model(torch.randn(8, width)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = load(tmp_path / "r")
    for m in (None, model):
        ctx = Context(run, model=m)
        assert near_zero_init(ctx) and gated_by_near_zero_init(ctx, near_zero_init(ctx)) == {}, ctx.graph.source
