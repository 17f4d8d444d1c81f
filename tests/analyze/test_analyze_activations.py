"""dead-units and saturation against brute-force counts on captured activations."""

import numpy as np
import pytest
import torch
from analyze_testlib import train_watched
from torch import nn

from normscope import load, watch
from normscope.analyze import analyze_full
from normscope.analyze.checks.dead_units import dead_profile
from normscope.analyze.context import Context
from normscope.analyze.registry import get_check


def test_dead_fraction_equals_brute_force_mlp(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[0].bias[:10] = -6.0  # born dead
        model[2].bias[:5] = -0.3  # partially active
    g = torch.Generator().manual_seed(0)
    batch = lambda i: (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))  # noqa: E731
    store = train_watched(model, tmp_path / "r", 40, batch, names=["1", "3"])
    ctx = Context(load(tmp_path / "r"))
    p = get_check("dead-units").thresholds | {"min_samples": 128}
    for name in ("1", "3"):
        prof = dead_profile(ctx, name, 0, p)
        rows = prof["window_rows"]
        outs = torch.cat(store[name][-rows:])  # the same sampled steps (every=1)
        brute_dead = ~(outs > 0).any(0).numpy()
        np.testing.assert_array_equal(prof["dead"], brute_dead)
        ever = torch.cat(store[name]).gt(0).any(0).numpy()
        np.testing.assert_array_equal(prof["born"], brute_dead & ~ever)
    assert prof is not None
    f = next(f for f in analyze_full(tmp_path / "r", config={"dead-units": {"min_samples": 128}}).findings
             if f.check == "dead-units" and f.layer == "1")  # fmt: skip
    assert f.evidence["dead_units"] == 10 and f.evidence["born_dead"] == 10
    assert f.evidence["dead_fraction"] == pytest.approx(10 / 32) and f.severity == "warning"


def test_dead_channels_equal_brute_force_conv_and_died_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 2))
    g = torch.Generator().manual_seed(0)
    batch = lambda i: (torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g))  # noqa: E731

    def kill(i, m):
        if i == 12:  # channels 0..2 die at step 12: their bias drops far below any pre-activation
            with torch.no_grad():
                m[0].bias[:3] = -50.0

    store = train_watched(model, tmp_path / "c", 30, batch, lr=0.0, on_step=kill, names=["1"])
    ctx = Context(load(tmp_path / "c"))
    p = get_check("dead-units").thresholds | {"min_samples": 64}
    prof = dead_profile(ctx, "1", 0, p)
    outs = torch.cat(store["1"][-prof["window_rows"] :])
    brute = ~(outs > 0).flatten(2).any(2).any(0).numpy()
    np.testing.assert_array_equal(prof["dead"], brute)
    assert prof["dead"][:3].all() and not prof["dead"][3:].any()
    assert prof["died_at"] == [12, 12, 12] and not prof["born"].any()


def sat_run(tmp_path, act, scale_at, steps=24):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), act, nn.Linear(40, 2))
    g = torch.Generator().manual_seed(0)
    batch = lambda i: (torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g))  # noqa: E731

    def rescale(i, m):
        if i in scale_at:
            with torch.no_grad():
                m[0].weight.mul_(scale_at[i])

    store = train_watched(model, tmp_path / type(act).__name__, steps, batch, lr=0.0, on_step=rescale, names=["1"])
    return store, analyze_full(tmp_path / type(act).__name__)


@pytest.mark.parametrize("act,mask", [
    (nn.Sigmoid(), lambda y: (y < 0.01) | (y > 0.99)),
    (nn.Tanh(), lambda y: y.abs() > 0.97),
    (nn.Hardtanh(), lambda y: (y <= -1) | (y >= 1)),
    (nn.ReLU6(), lambda y: y >= 6),  # only the upper bound: the lower one is ReLU's off region
])  # fmt: skip
def test_saturated_fraction_equals_brute_force(tmp_path, act, mask):
    store, a = sat_run(tmp_path, act, {0: 30.0})
    brute = [float(mask(y).double().mean()) for y in store["1"]]
    (f,) = [f for f in a.findings if f.check == "saturation"]
    w = f.evidence["window_steps"]
    assert f.evidence["saturated_fraction_end"] == pytest.approx(np.mean(brute[w[0] : w[1] + 1]), abs=1e-9)
    assert f.evidence["saturated_fraction_first"] == pytest.approx(brute[0], abs=1e-9)


def test_saturation_entered_and_left(tmp_path):
    store, a = sat_run(tmp_path, nn.Sigmoid(), {6: 40.0, 14: 1 / 40.0})
    (f,) = [f for f in a.findings if f.check == "saturation"]
    assert f.severity == "info" and f.evidence["episodes"] == [[6, 14]] and f.step == (6, 14)


class _SE(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as torchvision writes it: pool, fc1, ReLU, fc2, gate."""

    def __init__(self, c: int, r: int, gate: type = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(r, c, 1)
        self.scale_activation = gate()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def _se_net(gate=nn.Sigmoid, before: float = 0.0):
    torch.manual_seed(3)
    blocks = []
    for c_in in (3, 32, 32):
        conv = nn.Conv2d(c_in, 32, 3, padding=1, bias=False)
        blocks += [conv, nn.BatchNorm2d(32), nn.ReLU(), _SE(32, 8, gate)]
    net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    with torch.no_grad():
        for se in (m for m in net.modules() if isinstance(m, _SE)):
            se.fc1.bias[:4] = -10.0  # four of eight units start off for every input, as SE units do at init
    return net


@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid])
def test_born_dead_units_of_a_squeeze_excitation_bottleneck_are_info(tmp_path, gate):
    """Regression: transformers' RegNetY warned (error) 'dead-units 75 % … born dead' on the ReLU of its SE
    blocks: one pooled value per sample and channel, 2–6 σ from zero at init, so some units start off for
    every input. They are info, named as the SE bottleneck's; the ReLUs on the feature maps are judged as
    before, and a unit of the bottleneck that dies in training still counts."""
    from normscope.analyze.checks.dead_units import excitation_bottlenecks

    net = _se_net(gate)
    g = torch.Generator().manual_seed(0)
    train_watched(net, tmp_path / "r", 6, lambda i: (torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
                  lr=0.01)  # fmt: skip
    run = load(tmp_path / "r")
    ctx = Context(run)
    assert excitation_bottlenecks(ctx) == {f"{i}.activation": f"{i}.scale_activation" for i in (3, 7, 11)}
    fs = [f for f in analyze_full(run).findings if f.check == "dead-units" and "born_dead" in f.evidence]
    se = [f for f in fs if f.layer.endswith(".activation")]
    assert se and all(f.severity == "info" and f.evidence["born_dead"] >= 4 and f.evidence["died"] == 0 for f in se)
    assert all(f.evidence["excitation_gate"].endswith("scale_activation") for f in se)
    assert "squeeze-and-excitation bottleneck" in se[0].message
    # counted as a plain layer the same units would be an error (≥ 4/8 = 50 % ≥ 40 %)
    assert se[0].evidence["dead_fraction"] >= 0.5


def test_relu_before_a_sigmoid_without_pooling_is_no_excitation_bottleneck(tmp_path):
    """A ReLU → conv → sigmoid chain on full feature maps (a per-pixel attention map) is judged as usual."""
    from normscope.analyze.checks.dead_units import excitation_bottlenecks

    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.ReLU()
            self.proj = nn.Conv2d(8, 3, 1)
            self.gate = nn.Sigmoid()

        def forward(self, x):
            return x * self.gate(self.proj(self.act(self.conv(x))))

    net = nn.Sequential(Attn(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with torch.no_grad():
        net[0].conv.bias[:4] = -50.0
    g = torch.Generator().manual_seed(0)
    train_watched(net, tmp_path / "r", 6, lambda i: (torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
                  lr=0.01)  # fmt: skip
    run = load(tmp_path / "r")
    assert "0.act" in excitation_bottlenecks(Context(run))  # the structure alone matches …
    (f,) = [f for f in analyze_full(run).findings if f.check == "dead-units" and f.layer == "0.act"]
    assert f.severity == "error" and "excitation_gate" not in f.evidence  # … but it is not pooled


@pytest.mark.parametrize("nested", [False, True])
def test_an_mlp_ending_in_a_sigmoid_is_no_excitation_bottleneck(tmp_path, nested):
    """Review regression: ReLU → Linear → Sigmoid (a binary classifier's head, one value per sample and
    unit) read as an SE bottleneck and its born-dead units as info. An SE block reduces with a
    convolution inside a module, and its gate scales features that later layers read."""
    from normscope.analyze.checks.dead_units import excitation_bottlenecks

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    with torch.no_grad():
        head[0].bias[:20] = -50.0  # 20 of 32 units born dead
    net = nn.Sequential(nn.Identity(), head) if nested else head
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with watch(net, tmp_path / "r", every=1):
        for _ in range(8):
            x, y = torch.randn(64, 8), torch.randint(0, 2, (64, 1)).float()
            loss = nn.functional.binary_cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = load(tmp_path / "r")
    assert excitation_bottlenecks(Context(run)) == {}
    (f,) = [f for f in analyze_full(run).findings if f.check == "dead-units" and "born_dead" in f.evidence]
    assert f.severity == "error" and f.evidence["born_dead"] == 20
