"""non-finite localisation names the right module, forward and backward, and never crashes."""

import pytest
import torch
from torch import nn

from normscope import watch
from normscope.analyze import analyze_full

DEPTH = 5  # Linear layers "0", "2", "4", "6", "8" with ReLUs "1", "3", ... between


def mlp():
    layers = []
    for i in range(DEPTH):
        layers.append(nn.Linear(8, 8))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def run_with(tmp_path, model, steps=6, loss_fn=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = loss_fn or (lambda out: out.pow(2).mean())
    with watch(model, tmp_path / "r", every=1) as scope:
        for _ in range(steps):
            loss = loss_fn(model(torch.randn(16, 8)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss)
    return analyze_full(tmp_path / "r")


@pytest.mark.parametrize("layer", ["0", "2", "4", "6", "8", "3"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_forward_nan_names_the_injected_module(tmp_path, layer, value):
    model = mlp()
    calls = {"n": 0}

    def inject(mod, args, out):
        calls["n"] += 1
        if calls["n"] == 3:  # third training forward = step 2
            out = out.clone()
            out[1, 2] = value
            return out

    model.get_submodule(layer).register_forward_hook(inject)
    a = run_with(tmp_path, model)
    (f,) = [f for f in a.findings if f.check == "non-finite"]
    assert f.layer == layer and f.step == 2 and f.severity == "error"
    assert f.evidence["nan_count" if value != value else "inf_count"] == 1
    if layer != "0":
        assert f.evidence["input"]["nan_count"] == 0 and f.evidence["input"]["inf_count"] == 0
    # every other check reads only the steps before the NaN: nothing else above info
    assert {g.check for g in a.findings if g.severity != "info"} == {"non-finite"}


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class NaNBackward(nn.Module):
    def forward(self, x):
        return _NaNGrad.apply(x)


@pytest.mark.parametrize("after", [1, 3])
def test_backward_nan_names_the_module_whose_output_gradient_broke(tmp_path, after):
    layers = list(mlp())
    layers.insert(2 * after + 1, NaNBackward())  # after Linear "2*after" (and its ReLU, index shifts)
    model = nn.Sequential(*layers)
    a = run_with(tmp_path, model, steps=2)
    (f,) = [f for f in a.findings if f.check == "non-finite"]
    assert f.step == 0 and f.layer == str(2 * after)
    assert (
        f.evidence["first_backward_step"] == 0 and f.evidence["first_forward_step"] == 1
    )  # NaN weights after the step
    assert "backward" in f.message


def test_nan_loss_value_is_reported_without_a_layer(tmp_path):
    # log of a negative number: NaN loss, but a finite gradient (1/z)
    a = run_with(tmp_path, mlp(), steps=2, loss_fn=lambda out: torch.log(out - 1e6).mean())
    (f,) = [f for f in a.findings if f.check == "non-finite"]
    assert f.layer is None and "loss" in f.message and f.evidence["first_nonfinite_loss_step"] == 0


def test_nan_loss_gradient_blames_the_loss(tmp_path):
    # sqrt at 0: finite loss, infinite derivative → NaN gradient w.r.t. the last layer's output
    a = run_with(tmp_path, mlp(), steps=2, loss_fn=lambda out: torch.sqrt(out * 0).mean())
    (f,) = [f for f in a.findings if f.check == "non-finite"]
    assert f.layer == "8" and "loss" in f.message and f.evidence["first_backward_step"] == 0


def test_no_nan_no_finding(tmp_path):
    a = run_with(tmp_path, mlp(), steps=2)
    assert "non-finite" in a.checks_run and not [f for f in a.findings if f.check == "non-finite"]


class _Normalise(torch.nn.Module):
    """Parameter-free and hooked by nobody by default: divides by a sum that can be zero."""

    def forward(self, x):
        return x / x.sum(-1, keepdim=True)


def test_unhooked_parameter_free_module_is_named_as_the_first_offender(tmp_path):
    """Regression: non-finite named the first *hooked* module downstream of the real culprit."""
    from torch import nn

    from normscope import analyze_full, load, watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Normalise(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, tmp_path / "r", every=1) as scope:
        for step in range(4):
            x = torch.randn(16, 4)
            if step == 2:
                with torch.no_grad():
                    model[0].weight.zero_()
                    model[0].bias.zero_()  # the Linear's output is all zeros: 0 / 0 in _Normalise
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss)
    run = load(tmp_path / "r")
    assert [e["layer"] for e in run.meta["nonfinite_modules"]][:1] == ["1"]
    (f,) = [f for f in analyze_full(run).findings if f.check == "non-finite"]
    assert f.layer == "1" and f.step == 2 and f.evidence["module_type"] == "_Normalise"
    assert f.evidence["downstream_nonfinite"][:1] == ["2"] and "does not hook" in f.message
    # the hooked Linear before it stayed finite: it is not blamed
    s = run.stats
    assert (s[(s.layer == "0") & (s.step == 2)].nan_count == 0).all()
