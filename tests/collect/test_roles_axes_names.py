"""Roles by what a module is, channel axes from the data, phases by what happens, canonical names."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from normscope import NormscopeError, analyze_full, load, watch
from normscope import roles as R
from normscope.collect.select import canonical_names, plan_hooks


class FrozenBatchNorm2d(nn.Module):
    """BN with buffers only (detectron2/torchvision style)."""

    def __init__(self, c):
        super().__init__()
        for k, v in (("weight", torch.ones(c)), ("bias", torch.zeros(c)), ("running_mean", torch.zeros(c)),
                     ("running_var", torch.ones(c))):  # fmt: skip
            self.register_buffer(k, v)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


class MyRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt() * self.weight


class SquaredReLUThing(nn.Module):  # parameter-free, named like an activation
    def forward(self, x):
        return torch.relu(x) ** 2


class Gate(nn.Module):  # parameter-free, named like nothing: a user's role mapping says what it is
    def forward(self, x):
        return torch.sigmoid(x)


class Block(nn.Module):
    """A custom block: N×C×H×W in and out, no parameter of its own."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_roles_by_what_a_module_is():
    assert R.role(FrozenBatchNorm2d(4)) == "norm" and R.channels_first_norm(FrozenBatchNorm2d(4)) is True
    assert R.role(MyRMSNorm(8)) == "norm" and R.channels_first_norm(MyRMSNorm(8)) is None
    assert R.role(SquaredReLUThing()) == "activation"
    assert R.role(Gate()) is None and R.role(Gate(), "gate", {"gate": "activation"}) == "activation"
    assert R.role(Gate(), "x", {Gate: "dropout"}) == "dropout"
    assert R.role(nn.Linear(2, 2)) is None and R.role(nn.GELU()) == "activation" and R.role(nn.Dropout()) == "dropout"
    assert R.role(nn.Sequential(nn.LayerNorm(3))) is None  # a container named nothing is no norm
    with pytest.raises(NormscopeError, match="must be one of"):
        R.check_roles({"x": "normalisation"})
    with pytest.raises(NormscopeError, match="types or name globs"):
        R.check_roles({3: "norm"})


def test_transformers_activation_and_norm_classes_are_recognised():
    from transformers.activations import GELUActivation, NewGELUActivation, SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for act in (GELUActivation(), NewGELUActivation(), SiLUActivation()):
        assert R.role(act) == "activation", type(act)
    for norm in (LlamaRMSNorm(8), T5LayerNorm(8)):
        assert R.role(norm) == "norm" and R.feature_size(norm) == 8


def test_channel_axis_from_the_data(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), FrozenBatchNorm2d(6), Block(6), Gate(),
                          nn.Flatten(2), nn.Identity())  # fmt: skip
    x = torch.randn(4, 3, 5, 7)
    with watch(model, tmp_path / "r", every=1, include=["1", "2", "3", "5"], roles={"3": "activation"}) as scope:
        model(x).sum().backward()
        scope.step()
    s = load(tmp_path / "r").stats
    row = lambda layer, out="": s[(s.layer == layer) & (s.output == out)].iloc[0]  # noqa: E731
    assert row("1").channel_axis == 1 and len(row("1").ch_mean) == 6  # frozen BN: buffers say 6 channels
    assert len(row("1", "input").ch_mean) == 6  # and it records its input as a norm
    assert row("2").channel_axis == 1 and len(row("2").ch_mean) == 6  # the block inherits its input's axis
    assert row("3").channel_axis == 1 and len(row("3").ch_mean) == 6  # user role: activation, layout kept
    # (N, C, H·W) from Flatten, a view of the gate's output: its channel axis carries over (before, the rank
    # rule took the 35 positions as channels)
    assert row("5").channel_axis == 1 and len(row("5").ch_mean) == 6
    meta = {m["name"]: m for m in load(tmp_path / "r").meta["modules"]}
    assert meta["3"]["role"] == "activation" and meta["1"]["role"] == "norm"


class _SamePad(nn.Module):
    """wav2vec2's SamePadLayer: drops the last time step of the positional conv's output (a slice)."""

    def forward(self, x):
        return x[:, :, :-1]


class _Swap(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


@pytest.mark.parametrize("view,axis", [(_SamePad, 1), (_Swap, -1)])
def test_channel_axis_carries_through_a_view_of_a_recorded_output(tmp_path, view, axis):
    """Regression: transformers' wav2vec2 positional conv (B, 32, T) → SamePad (a slice) → GELU recorded the
    GELU's channels on the time axis: the slice is a new tensor, so nothing was inherited and the rank rule
    (3-D: last) chose T. A view now inherits its base's channel axis where its stride and size went: in
    place through a slice, to the end through a transpose. Per-channel moments against brute force."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3), view(), nn.GELU())
    x = torch.randn(5, 4, 12)
    with watch(model, tmp_path / "r", every=1) as scope:
        model(x).sum().backward()
        scope.step()
    s = load(tmp_path / "r").stats
    r = s[(s.layer == "2") & (s.output == "")].iloc[0]
    with torch.no_grad():
        h = model(x).double()
    want = h.mean(dim=(0, 2)) if axis == 1 else h.mean(dim=(0, 1))
    assert r.channel_axis == axis and len(r.ch_mean) == 6
    np.testing.assert_allclose(r.ch_mean, want.numpy(), rtol=1e-5, atol=1e-6)


def test_axis_through_view_is_none_where_the_channel_axis_is_not_unique():
    from normscope.collect.scope_hooks import axis_through_view

    base = torch.randn(2, 6, 6)
    assert axis_through_view(base[:, :, 1:], base, 1) == 1
    assert axis_through_view(base.transpose(1, 2), base, 1) == -1
    assert axis_through_view(base.reshape(2, 36), base, 1) is None  # channels merged away
    assert axis_through_view(base.as_strided((2, 6, 6), (36, 1, 1)), base, 2) is None  # two axes could hold it


def test_eval_under_inference_mode_reads_the_axis_training_inherited(tmp_path):
    """Review regression: a view made under torch.inference_mode() has no _base, so the GELU after
    SamePad's slice read its channels on the time axis in eval (49 'channels') and on axis 1 in training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 32, 3), _SamePad(), nn.GELU())
    with watch(model, tmp_path / "r", every=1) as scope:
        model(torch.randn(5, 4, 52)).sum().backward()
        with torch.inference_mode():
            model.eval()
            model(torch.randn(5, 4, 52))
        scope.step()
    s = load(tmp_path / "r").stats
    rows = s[(s.layer == "2") & (s.output == "")]
    assert set(rows.phase) == {"train", "eval"}
    assert set(rows.channel_axis) == {1} and {len(m) for m in rows.ch_mean} == {32}


def test_norm_weight_decides_axis_when_only_one_axis_matches(tmp_path):
    model = nn.Sequential(nn.Linear(5, 8), MyRMSNorm(8))
    with watch(model, tmp_path / "r", every=1) as scope:
        model(torch.randn(2, 3, 8, 5)).sum().backward()  # (N, H, W, C): channels last
        scope.step()
    s = load(tmp_path / "r").stats
    r = s[(s.layer == "1") & (s.output == "")].iloc[0]
    assert r.channel_axis == -1 and len(r.ch_mean) == 8


def test_canonical_names_strip_wrapper_prefixes(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))

    plain = {p.name for p in plan_hooks(make())}
    dp = nn.DataParallel(make())  # "module." like DDP
    compiled = torch.compile(make())  # "_orig_mod." (not run: only the names matter here)
    inner = make()
    inner[2] = checkpoint_wrapper(inner[2])
    for wrapped in (dp, compiled, inner):
        assert {p.name for p in plan_hooks(wrapped)} == plain, type(wrapped)
    names = canonical_names(dp)
    assert names["module.0"] == "0" and names["module"] == "" and names[""] == ""
    # a user's own submodule called "module" keeps its name
    own = nn.Sequential()
    own.add_module("module", nn.Linear(2, 2))
    assert canonical_names(own)["module"] == "module"
    # raw names stay in meta.json, parameters get canonical names
    with watch(dp, tmp_path / "dp", every=1) as scope:
        loss = dp(torch.randn(3, 4)).sum()
        loss.backward()
        scope.step()
    run = load(tmp_path / "dp")
    mods = {m["name"]: m for m in run.meta["modules"]}
    assert mods["0"]["raw"] == "module.0" and mods["<root>"]["type"] == "Sequential"
    assert set(run.params.param) == {n for n, _ in make().named_parameters()}
    assert set(run.stats.layer) == plain


def test_reentrant_checkpoint_first_pass_is_train_with_gradients(tmp_path):
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            h = self.a(x)
            return self.head(checkpoint(self.body, h, use_reentrant=True))

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), 0.1)
    with watch(net, tmp_path / "r", every=1):
        for _ in range(2):
            loss = net(torch.randn(6, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = load(tmp_path / "r")
    body = run.stats[run.stats.layer.str.startswith("body")]
    assert set(body.phase) == {"train"} and (body.forwards == 1).all()
    g = run.grads
    assert set(g.layer) >= {"body.0", "body.1", "body.2", "a", "head"}
    assert (g.groupby(["step", "layer", "call", "output"]).size() == 1).all()


def test_functional_call_records_and_torch_func_grad_warns_once(tmp_path):
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 4)
    with watch(model, tmp_path / "fc", every=1) as scope:
        out = functional_call(model, params, (x,))  # plain functional_call: ordinary hooks
        scope.step()
    s = load(tmp_path / "fc").stats
    assert set(s.layer) == {"0", "1", "2"} and len(s) == 3

    def loss_fn(p):
        return functional_call(model, p, (x,)).pow(2).mean()

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with watch(model, tmp_path / "g", every=1) as scope:
            for _ in range(3):
                grads = grad(loss_fn)(params)
                scope.step()
    msgs = [str(m.message) for m in w if "torch.func" in str(m.message)]
    assert len(msgs) == 1 and "not recorded" in msgs[0]
    run = load(tmp_path / "g")
    assert len(run.stats) == 0 and not run.meta.get("hook_errors")
    assert any("torch.func" in n for n in run.meta.get("notes", []))
    assert set(grads) == set(params) and out.shape == (5, 1)


def test_inference_only_run_is_judged_on_eval_rows(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Sigmoid())
    with torch.no_grad():
        model[0].bias[:16] = -50.0  # half the units can never fire
        model[2].weight.mul_(40.0)  # the sigmoid saturates
    model.eval()
    with watch(model, tmp_path / "inf", every=1), torch.no_grad():
        for _ in range(8):
            model(torch.randn(64, 8))
    run = load(tmp_path / "inf")
    assert set(run.stats.phase) == {"eval"}
    a = analyze_full(run)
    got = {f.check: f for f in a.findings}
    assert "dead-units" in got and got["dead-units"].evidence["phase"] == "eval"
    assert got["dead-units"].evidence["dead_fraction"] == pytest.approx(0.5)
    assert "saturation" in got and got["saturation"].evidence["phase"] == "eval"
    reasons = {s.check: s.reason for s in a.skipped}
    assert "inference-only" in reasons["covariate-shift"]
    assert np.isfinite(run.stats["mean"]).all()
