"""Every foldable pattern × random BN statistics × dtype, compared against the unfolded model.

float64 models: max relative error ≤ 1e-6; float32 models (folded weights in float32, run in
float32, compared with the unfolded model in float64): ≤ 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fold_testlib import STAT_VARIANTS, bn_left, randomize_all, rel_err
from torch import nn

from normscope.fold import ChannelAdd, fold_bn


class Chain(nn.Module):
    """Runs ``layers`` in order; ``ops`` maps an index to a functional op applied after it."""

    def __init__(self, *layers: nn.Module, after: dict | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.after = after or {}

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            op = self.after.get(i)
            if op == "relu":
                x = torch.relu(x)
            elif op == "permute021":
                x = x.permute(0, 2, 1)
            elif op == "transpose12":
                x = x.transpose(1, 2)
            elif op == "torch.flatten":
                x = torch.flatten(x, 1)
            elif op == "view":
                x = x.view(x.size(0), -1)
            elif op == "reshape":
                x = x.reshape(x.shape[0], -1)
        return x


def BN(dim: int, c: int, affine: bool) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](c, affine=affine)


# name -> (builder(affine) -> model, input shape, expected roles, expected pre-add count)
PATTERNS = {
    "conv1d+bias": (lambda a: Chain(nn.Conv1d(4, 6, 3), BN(1, 6, a)), (2, 4, 9), ["producer"], 0),
    "conv2d groups dilation stride nobias": (
        lambda a: Chain(nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, bias=False), BN(2, 6, a)),
        (2, 4, 11, 11),
        ["producer"],
        0,
    ),
    "conv2d depthwise": (
        lambda a: Chain(nn.Conv2d(6, 6, 3, padding=1, groups=6), BN(2, 6, a)),
        (2, 6, 7, 7),
        ["producer"],
        0,
    ),
    "conv3d groups": (
        lambda a: Chain(nn.Conv3d(4, 8, 2, groups=4, bias=False), BN(3, 8, a)),
        (2, 4, 4, 5, 5),
        ["producer"],
        0,
    ),
    "convT1d groups": (
        lambda a: Chain(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), BN(1, 6, a)),
        (2, 4, 7),
        ["producer"],
        0,
    ),
    "convT2d groups dilation outpad nobias": (
        lambda a: Chain(
            nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, output_padding=1, groups=3, dilation=1, bias=False),
            BN(2, 9, a),
        ),
        (2, 6, 5, 5),
        ["producer"],
        0,
    ),
    "convT3d groups": (
        lambda a: Chain(nn.ConvTranspose3d(4, 6, 2, groups=2), BN(3, 6, a)),
        (1, 4, 3, 3, 3),
        ["producer"],
        0,
    ),
    "linear bn1d 2d": (lambda a: Chain(nn.Linear(7, 5), BN(1, 5, a)), (4, 7), ["producer"], 0),
    "linear nobias bn1d": (lambda a: Chain(nn.Linear(7, 5, bias=False), BN(1, 5, a)), (4, 7), ["producer"], 0),
    "linear 3d permute bn1d": (
        lambda a: Chain(nn.Linear(7, 5), BN(1, 5, a), after={0: "permute021"}),
        (3, 4, 7),
        ["producer"],
        0,
    ),
    "bn conv pad0 groups": (lambda a: Chain(BN(2, 6, a), nn.Conv2d(6, 4, 3, groups=2)), (2, 6, 7, 7), ["consumer"], 0),
    "bn conv reflect": (
        lambda a: Chain(BN(2, 4, a), nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")),
        (2, 4, 6, 6),
        ["consumer"],
        0,
    ),
    "bn conv replicate nobias": (
        lambda a: Chain(BN(1, 4, a), nn.Conv1d(4, 5, 3, padding=2, padding_mode="replicate", bias=False)),
        (2, 4, 8),
        ["consumer"],
        0,
    ),
    "bn conv circular": (
        lambda a: Chain(BN(2, 4, a), nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")),
        (2, 4, 6, 6),
        ["consumer"],
        0,
    ),
    "bn conv zero padding (pre-add)": (
        lambda a: Chain(BN(2, 4, a), nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)),
        (2, 4, 7, 7),
        ["consumer"],
        1,
    ),
    "bn convT (pre-add)": (
        lambda a: Chain(BN(2, 4, a), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)),
        (2, 4, 5, 5),
        ["consumer"],
        1,
    ),
    "bn linear": (lambda a: Chain(BN(1, 6, a), nn.Linear(6, 3)), (4, 6), ["consumer"], 0),
    "bn flatten linear": (
        lambda a: Chain(BN(2, 3, a), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)),
        (2, 3, 4, 4),
        ["consumer"],
        0,
    ),
    "bn torch.flatten linear": (
        lambda a: Chain(BN(2, 3, a), nn.Linear(48, 5), after={0: "torch.flatten"}),
        (2, 3, 4, 4),
        ["consumer"],
        0,
    ),
    "bn view linear": (
        lambda a: Chain(BN(3, 2, a), nn.Linear(2 * 27, 4), after={0: "view"}),
        (2, 2, 3, 3, 3),
        ["consumer"],
        0,
    ),
    "bn1d 3d transpose linear": (
        lambda a: Chain(BN(1, 4, a), nn.Linear(4, 3), after={0: "transpose12"}),
        (2, 4, 6),
        ["consumer"],
        0,
    ),
    "conv bn relu conv bn": (
        lambda a: Chain(nn.Conv2d(3, 4, 3, padding=1), BN(2, 4, a), nn.Conv2d(4, 4, 1), BN(2, 4, a), after={1: "relu"}),
        (2, 3, 5, 5),
        ["producer", "producer"],
        0,
    ),
}


def _build(name: str, variant: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, list, int]:
    builder, shape, roles, pre = PATTERNS[name]
    torch.manual_seed(0)
    model = randomize_all(builder(variant != "affine_false"), variant).to(dtype)
    return model, torch.randn(shape, dtype=dtype), roles, pre


@pytest.mark.parametrize("variant", STAT_VARIANTS)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_folds_exactly_float64(name: str, variant: str) -> None:
    model, x, roles, pre = _build(name, variant, torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x)
    assert res.tracing == "torch.fx"
    assert not res.skipped, res.skipped
    assert [p.role for p in res.folded] == roles
    assert sum(p.pre_add for p in res.folded) == pre
    assert sum(isinstance(m, ChannelAdd) for m in res.model.modules()) == pre
    assert bn_left(res.model) == 0
    with torch.no_grad():
        assert rel_err(ref(x), res.model(x)) <= 1e-6
    assert res.error is not None and res.error.max_rel <= 1e-6
    for name_, p in model.state_dict().items():  # inplace=False leaves the model alone
        assert torch.equal(p, ref.state_dict()[name_])


@pytest.mark.parametrize("variant", STAT_VARIANTS)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_folds_exactly_float32(name: str, variant: str) -> None:
    model, x, roles, _ = _build(name, variant, torch.float32)
    res = fold_bn(model, x)
    assert not res.skipped, res.skipped
    assert bn_left(res.model) == 0
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        assert rel_err(truth, res.model(x)) <= 1e-4
    assert res.error.max_rel <= 1e-4


@pytest.mark.parametrize(
    "name", ["conv2d depthwise", "bn conv zero padding (pre-add)", "bn flatten linear", "linear bn1d 2d"]
)
def test_inplace_edits_the_model_itself(name: str) -> None:
    model, x, _, _ = _build(name, "neg_gamma", torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x, inplace=True)
    assert res.model is model
    assert not res.skipped and bn_left(model) == 0
    with torch.no_grad():
        assert rel_err(ref(x), model(x)) <= 1e-6
    assert res.error.max_rel <= 1e-6


def test_batch_size_of_example_does_not_matter() -> None:
    model, x, _, _ = _build("bn flatten linear", "neg_gamma", torch.float64)
    res = fold_bn(model, x[:1])
    x_big = torch.randn(7, *x.shape[1:], dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x_big), res.model(x_big)) <= 1e-6


@pytest.mark.parametrize("inplace", [False, True])
def test_consecutive_bns_fold_in_later_passes(inplace):
    torch.manual_seed(0)
    model = randomize_all(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 2, 1),
        ),
        "neg_gamma",
    ).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = copy.deepcopy(model)
    res = fold_bn(model, x, inplace=inplace)
    assert len(res.folded) == 4 and not res.skipped and bn_left(res.model) == 0
    with torch.no_grad():
        assert rel_err(ref(x), res.model(x)) <= 1e-9
