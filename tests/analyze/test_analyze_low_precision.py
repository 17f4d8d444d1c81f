"""update-ratio on weights stored in bfloat16/float16: an update below half the number spacing at a
weight's size rounds away (pure-bf16 training), told apart from a learning rate far too low."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from normscope import load, watch
from normscope.analyze import analyze_full
from normscope.analyze.checks.update_ratio import half_spacing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_spacing_is_where_rounding_keeps_the_old_value(dtype):
    name = str(dtype).removeprefix("torch.")
    rng = np.random.default_rng(0)
    for x in np.concatenate([rng.uniform(1e-3, 8, 200), [0.25, 1.0, 2.0]]):
        x = float(torch.tensor(x).to(dtype))  # a representable value
        h = half_spacing(x, name)

        def cast(v):
            return float(torch.tensor(v, dtype=torch.float64).to(dtype))

        assert cast(x - 0.99 * h) == x and cast(x + 0.99 * h) == x  # below half the gap: rounds back
        assert cast(x - 1.01 * h) != x  # just above: reaches the next smaller number


def _ln_net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4)).to(dtype)


def _train(net, run_dir, lr=1e-3):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    dtype = next(net.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    with watch(net, run_dir, every=1):
        for _ in range(10):
            x, y = torch.randn(64, 16, generator=g).to(dtype), torch.randint(0, 4, (64,), generator=g)
            loss = nn.functional.cross_entropy(net(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return analyze_full(load(run_dir))


def test_pure_bf16_norm_gains_that_never_move_are_rounding_not_a_low_lr(tmp_path):
    """Found on the zoo trained as model.bfloat16() (Llama, T5, ConvNeXt): their norm gains at 1.0 never
    moved under AdamW 1e-3 (bf16's gap below 1 is 2^-8, half of it 0.00195 > lr), which update-ratio
    reported as 'two decades below … frozen by accident'."""
    net = _ln_net(torch.bfloat16)
    before = net[1].weight.detach().clone()
    a = _train(net, tmp_path / "bf16")
    assert torch.equal(net[1].weight, before)  # brute force: not one element moved
    assert not torch.equal(net[0].weight, _ln_net(torch.bfloat16)[0].weight)  # the matrices did
    (f,) = [f for f in a.findings if f.check == "update-ratio" and "rounded_away" in f.evidence]
    r = f.evidence["rounded_away"]
    assert f.severity == "warning" and "1.weight" in r and "0.weight" not in r
    assert r["1.weight"]["dtype"] == "bfloat16" and r["1.weight"]["half_spacing"] == pytest.approx(2.0**-9)
    assert r["1.weight"]["step_per_element"] == pytest.approx(1e-3)
    assert "rounds back to the old value" in f.message and "float32 master weights" in f.recommendation
    assert load(tmp_path / "bf16").meta["param_dtypes"]["1.weight"] == "bfloat16"


def test_the_same_net_in_float32_has_no_rounding_finding(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        a = _train(_ln_net(torch.float32), tmp_path / "fp32")
    assert not [f for f in a.findings if f.check == "update-ratio" and "rounded_away" in f.evidence]
    assert load(tmp_path / "fp32").meta["param_dtypes"] == {}


def test_an_unused_or_gradient_free_bf16_parameter_is_not_rounding(tmp_path):
    """Review regression: an unused bf16 parameter (no gradient) was reported both as 'every update rounds
    back' (a warning, false) and as 'received no gradient' (info). Only the second holds; a bf16 weight
    whose gradient is exactly zero is not rounding either."""
    net = _ln_net(torch.bfloat16)
    net.register_parameter("token", nn.Parameter(torch.ones(32, dtype=torch.bfloat16)))  # never used
    a = _train(net, tmp_path / "r")
    ur = [f for f in a.findings if f.check == "update-ratio"]
    rounded = {k for f in ur for k in f.evidence.get("rounded_away", {})}
    assert "token" not in rounded and "1.weight" in rounded
    (f,) = [f for f in ur if "no_gradient" in f.evidence]
    assert f.evidence["no_gradient"] == ["token"] and f.severity == "info"
