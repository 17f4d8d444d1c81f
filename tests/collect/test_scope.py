"""The collector end to end: hooks, steps, call sites, outputs, numerics untouched."""

import math

import models
import numpy as np
import pytest
import reference as ref
import torch
from torch import nn

from normscope import NormscopeError, load, watch
from normscope.collect import reducers as R


def hist_spec(meta, layer):
    h = meta["histograms"][layer]
    return R.HistSpec(h["kind"], h["lo"], h["hi"])


def sat_spec(module):
    from normscope.collect.select import hist_and_sat

    return hist_and_sat(module)[1]


def total_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_inplace_relu_resnet_identical_losses(tmp_path):
    torch.manual_seed(1)
    bare = models.TinyResNet()
    watched = models.TinyResNet()
    watched.load_state_dict(bare.state_dict())
    want = models.train(bare, 6)
    with watch(watched, tmp_path / "run", every=1) as scope:
        got = models.train(watched, 6)
    assert got == want  # bit-identical: the collector never touches numerics
    assert scope.hook_count == 0 and total_hooks(watched) == 0
    run = load(tmp_path / "run")
    assert run.meta["status"] == "complete"
    assert sorted(run.stats["step"].unique()) == list(range(6))
    # the shared in-place ReLU of each block is recorded per call site
    calls = run.stats[(run.stats.step == 0) & (run.stats.layer == "layer1.relu")]["call"].tolist()
    assert sorted(calls) == [0, 1]
    # every BN also records its input, and gradients arrive for every train output
    assert ((run.stats.layer == "stem.1") & (run.stats.output == "input")).sum() == 6
    g0 = run.grads[run.grads.step == 0]
    assert set(g0.layer) >= {"stem.0", "stem.1", "stem.2", "layer1.relu", "fc"}


def test_recorded_stats_equal_captured_tensors(tmp_path):
    model = models.TinyResNet()
    captured, grads = {}, {}

    def cap(name):
        def hook(mod, args, out):
            k = (name, sum(1 for key in captured if key[0] == name))
            captured[k] = out.detach().clone()
            if out.requires_grad:
                out.register_hook(lambda g, k=k: grads.__setitem__(k, g.detach().clone()))

        return hook

    names = ["stem.0", "stem.1", "stem.2", "layer1.relu", "layer2.short.0", "fc"]
    for n in names:
        model.get_submodule(n).register_forward_hook(cap(n))
    with watch(model, tmp_path / "r", every=1, hist_max=512):
        models.train(model, 1)
    run = load(tmp_path / "r")
    rows = run.stats[run.stats.output == ""].set_index(["layer", "call"])
    grows = run.grads.set_index(["layer", "call"])
    for (name, call), t in captured.items():
        row = rows.loc[(name, call)]
        want = ref.act_stats(t.numpy(), int(row.channel_axis), hist_spec(run.meta, name),
                             sat_spec(model.get_submodule(name)), 512)  # fmt: skip
        scale = float(t.abs().max())
        assert row["count"] == want["count"]
        assert row["mean"] == pytest.approx(want["mean"], rel=1e-4, abs=1e-6 * scale)
        assert row["std"] == pytest.approx(want["std"], rel=1e-4)
        assert row["frac_zero"] == pytest.approx(want["frac_zero"])
        np.testing.assert_allclose(row["ch_var"], want["ch_var"], rtol=1e-3, atol=1e-7)
        np.testing.assert_array_equal(row["active"], want["active"])
        assert np.abs(row["hist"] - want["hist"]).sum() <= 2 * want["_hist_slack"]
        g = ref.grad_stats(grads[(name, call)].numpy())
        assert grows.loc[(name, call)]["norm"] == pytest.approx(g["norm"], rel=1e-5)
        assert grows.loc[(name, call)]["max_abs"] == pytest.approx(g["max_abs"], rel=1e-6)
    # the conv output and the BN input are the same tensor: identical rows (reused reduction)
    s = run.stats
    conv = s[(s.layer == "stem.0")].iloc[0]
    bn_in = s[(s.layer == "stem.1") & (s.output == "input")].iloc[0]
    assert conv["mean"] == bn_in["mean"] and conv["std"] == bn_in["std"]


def test_parameter_norms_and_updates(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].bias.requires_grad_(False)  # frozen parameter
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    with watch(model, tmp_path / "p", every=1):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        gnorm = {n: (p.grad.norm().item() if p.grad is not None else math.nan) for n, p in model.named_parameters()}
        opt.step()
    p = load(tmp_path / "p").params.set_index("param")
    for n, w in model.named_parameters():
        assert p.loc[n, "norm"] == pytest.approx(w.detach().norm().item(), rel=1e-6)
        assert p.loc[n, "update_norm"] == pytest.approx((w.detach() - before[n]).norm().item(), rel=1e-5, abs=1e-12)
        if math.isnan(gnorm[n]):
            assert math.isnan(p.loc[n, "grad_norm"])
        else:
            assert p.loc[n, "grad_norm"] == pytest.approx(gnorm[n], rel=1e-6)
    assert p.loc["0.bias", "update_norm"] == 0.0 and not p.loc["0.bias", "requires_grad"]
    assert p.loc["0.weight", "lr"] == 0.1 and p.loc["0.weight", "weight_decay"] == 0.01


def test_every_k_sampling_and_scalars(tmp_path):
    model = models.TinyResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, tmp_path / "k", every=3, optimizer=opt) as scope:
        for _ in range(7):
            out = model(torch.randn(4, 3, 8, 8))
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.log(loss=loss)  # after the step: belongs to the step that just ended
    run = load(tmp_path / "k")
    assert run.steps == [0, 3, 6]
    assert sorted(run.params.step.unique()) == [0, 3, 6]
    assert run.scalars.step.tolist() == [0, 3, 6]


def test_eval_forwards_tagged_separately(tmp_path):
    model = models.TinyResNet()
    with watch(model, tmp_path / "e", every=1):
        models.train(model, 1)
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))
            model(torch.randn(3, 3, 8, 8))  # two eval batches aggregate into one row
    s = load(tmp_path / "e").stats
    ev = s[s.phase == "eval"]
    assert set(ev.step) == {1}
    fc = ev[ev.layer == "fc"].iloc[0]
    assert fc["forwards"] == 2 and fc["count"] == 5 * 10 and fc["samples"] == 5
    assert (s[s.phase == "train"].step == 0).all()


def test_shared_module_recorded_per_call(tmp_path):
    model = models.SharedMLP()
    with watch(model, tmp_path / "s", every=1) as scope:
        x = torch.randn(5, 4)
        model(x).sum().backward()
        scope.step()
    s = load(tmp_path / "s").stats
    assert sorted(s[s.layer == "block"].call) == [0, 1]
    assert sorted(s[s.layer == "act"].call) == [0, 1, 2]
    order = load(tmp_path / "s").layers
    assert list(zip(order.layer, order.call))[:4] == [("inp", 0), ("act", 0), ("block", 0), ("act", 1)]


def test_dict_dataclass_and_non_tensor_outputs(tmp_path):
    model = models.DataclassOut()
    with watch(model, tmp_path / "d", every=1, include=["enc.lin", "head", "enc", ""]) as scope:
        model(torch.randn(3, 4)).logits.sum().backward()
        scope.step()
    s = load(tmp_path / "d").stats
    paths = set(zip(s.layer, s.output))
    assert ("enc", "a") in paths and ("enc", "pair.0") in paths
    assert ("<root>", "logits") in paths and ("<root>", "hidden") in paths
    assert not any(p.endswith("pair.1") or p == "note" for _, p in paths)
    m2 = models.WithNonTensor()
    with watch(m2, tmp_path / "n", every=1) as scope:
        m2(torch.randn(3, 4)).sum().backward()
        scope.step()
    s2 = load(tmp_path / "n").stats
    assert set(s2.layer) == {"lin"}


def test_bf16_autocast_cpu(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    with watch(model, tmp_path / "b", every=1) as scope:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(32, 8))
            ref_out = out.detach().float()
        out.float().sum().backward()
        scope.step()
    s = load(tmp_path / "b").stats.set_index("layer")
    assert s.loc["2", "mean"] == pytest.approx(ref_out.mean().item(), rel=1e-5)
    assert s.loc["2", "std"] == pytest.approx(ref_out.std(unbiased=False).item(), rel=1e-4)
    assert load(tmp_path / "b").grads.layer.nunique() == 3


def test_gradient_checkpointing_not_double_counted(tmp_path):
    model = models.Checkpointed()
    with watch(model, tmp_path / "c", every=1) as scope:
        model(torch.randn(6, 4)).sum().backward()
        scope.step()
    s = load(tmp_path / "c").stats
    assert sorted(s.layer) == ["a", "act", "b"]
    assert (s.call == 0).all() and (s.forwards == 1).all()


def test_exception_in_forward_removes_hooks(tmp_path):
    model = models.Raises()
    with pytest.raises(RuntimeError, match="boom"):
        with watch(model, tmp_path / "x", every=1) as scope:
            model(torch.randn(2, 4)).sum().backward()
            scope.step()
            model(torch.randn(3, 4))
    assert total_hooks(model) == 0
    run = load(tmp_path / "x")
    assert run.meta["status"].startswith("failed: RuntimeError")
    assert 0 in run.steps


def test_hook_error_never_breaks_training(tmp_path, monkeypatch):
    model = models.TinyResNet()
    from normscope.collect import scope as scope_mod

    def broken(*a, **k):
        raise ValueError("reducer exploded")

    monkeypatch.setattr(scope_mod.R, "reduce_act", broken)
    with pytest.warns(UserWarning, match="reducer exploded"):
        with watch(model, tmp_path / "h", every=1):
            losses = models.train(model, 2)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any("reducer exploded" in e for e in load(tmp_path / "h").meta["hook_errors"])


def test_include_exclude_by_glob_and_type(tmp_path):
    model = models.TinyResNet()
    with watch(model, tmp_path / "i", every=1, include=[nn.Conv2d, "fc"], exclude=["layer2.*"]):
        models.train(model, 1)
    layers = set(load(tmp_path / "i").stats.layer)
    assert layers == {"stem.0", "layer1.conv1", "layer1.conv2", "fc"}
    with pytest.raises(NormscopeError, match="selected no module"):
        watch(model, tmp_path / "j", include=["nothing*"])


def test_manual_step_without_optimizer(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())
    with watch(model, tmp_path / "m", every=2) as scope:
        for _ in range(4):
            model(torch.randn(2, 3) * 10).sum().backward()
            scope.step()
    run = load(tmp_path / "m")
    assert run.steps == [0, 2]
    sig = run.stats[run.stats.layer == "1"]
    assert (sig.frac_sat > 0).all()
    p = run.params
    assert (p[p.step == 2].update_norm == 0).all()  # weights never changed: ‖Δw‖ = 0, measured
    assert p[p.step == 0].update_norm.isna().all()  # before the manual loop showed itself


def test_manual_update_loop_records_update_norms(tmp_path):
    """Regression (zoo issue): scope.step() with a hand-written update recorded no ‖Δw‖."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    want = {}
    with watch(model, tmp_path / "u", every=2) as scope:
        for step in range(4):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            want[step] = {n: float((before[n] - p.detach()).norm()) for n, p in model.named_parameters()}
            scope.step()
    p = load(tmp_path / "u").params
    assert sorted(p.step.unique()) == [0, 2]
    # step 0: the loop has not shown itself yet (no weight copy held through a forward on the
    # chance that no optimizer comes), so its ‖Δw‖ is not measured; from step 2 on it is
    assert p[p.step == 0].update_norm.isna().all()
    for r in p[p.step == 2].itertuples():
        assert r.update_norm == pytest.approx(want[r.step][r.param], rel=1e-5) and r.update_norm > 0


def test_memory_bounded_between_flushes(tmp_path):
    model = models.TinyResNet()
    with watch(model, tmp_path / "f", every=1, flush_every=2) as scope:
        models.train(model, 5)
        assert scope._pending == [] and scope._writer.pending_rows < 2 * 60
        assert len(scope._recent) <= 8
    parts = list((tmp_path / "f" / "stats" / "stats").glob("part-*.parquet"))
    assert len(parts) == 3  # steps {0,1}, {2,3}, {4}
    assert load(tmp_path / "f").steps == [0, 1, 2, 3, 4]


def test_existing_run_never_overwritten(tmp_path):
    model = nn.Linear(2, 2)
    with watch(model, tmp_path / "o", every=1):
        model(torch.randn(1, 2))
    with pytest.raises(NormscopeError, match="already holds a normscope run"):
        with watch(model, tmp_path / "o"):
            pass


def test_bad_options_one_line_errors():
    with pytest.raises(NormscopeError, match="every must be"):
        watch(nn.Linear(2, 2), every=0)
    with pytest.raises(NormscopeError, match="needs a torch.nn.Module"):
        watch("model")
    with pytest.raises(NormscopeError, match="name globs"):
        watch(nn.Linear(2, 2), include=[3])


class NanMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        h = self.b(h)
        m = torch.ones_like(h)
        m[0, 0] = float("nan")
        return self.c(h * m)  # a NaN appears between b and c, and flows back into b and a


def test_non_finite_recorded_without_crashing(tmp_path):
    model = NanMiddle()
    with watch(model, tmp_path / "nan", every=1) as scope:
        model(torch.randn(3, 4)).sum().backward()
        scope.step()
    run = load(tmp_path / "nan")
    s = run.stats.set_index("layer")
    assert s.loc["a", "nan_count"] == 0 and s.loc["b", "nan_count"] == 0
    assert s.loc["c", "nan_count"] == 1  # row 0 of c's output is NaN
    assert math.isfinite(s.loc["c", "mean"])  # statistics of the finite part
    g = run.grads.set_index("layer")
    assert g.loc["c", "nan_count"] == 0  # d(sum)/d(c's output) is all ones
    assert g.loc["b", "nan_count"] == 1  # ones · c.weight · NaN-mask: one NaN entry
    assert g.loc["a", "nan_count"] == 4  # row 0 of b.weightᵀ · grad: all four entries
    assert math.isfinite(g.loc["a", "norm"])


def test_wrapped_optimizer_is_unwrapped(tmp_path):
    """Regression: accelerate's AcceleratedOptimizer (a torch Optimizer without its own hooks state)."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner):  # deliberately skips Optimizer.__init__, like accelerate
            self.optimizer = inner

        def step(self, closure=None):
            return self.optimizer.step(closure)

    model = nn.Sequential(nn.Linear(3, 3))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, tmp_path / "w", every=1, optimizer=Wrapper(inner)):
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
            inner.step()
    assert load(tmp_path / "w").steps == [0, 1]


def test_reused_reduction_only_for_the_same_statistics(tmp_path):
    """A module may return its input tensor itself (eval-mode Dropout, a clip that acts only in
    training): the producer's reduction is reused only when the statistics asked for are the same."""

    class TrainClip(nn.Hardtanh):
        def forward(self, x):
            return super().forward(x) if self.training else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 64)
            self.drop = nn.Dropout(0.5)
            self.clip = TrainClip(-0.1, 0.1)

        def forward(self, x):
            return self.clip(self.drop(self.lin(x)))

    model = Net().eval()
    x = torch.randn(32, 4)
    with torch.no_grad():
        h = model.lin(x)
    with watch(model, tmp_path / "re", every=1) as scope:
        with torch.no_grad():
            model(x)
        scope.step()
    s = load(tmp_path / "re").stats.set_index("layer")
    assert s.loc["drop", "mean"] == s.loc["lin", "mean"]  # the same tensor: one reduction
    want = ((h <= -0.1) | (h >= 0.1)).float().mean().item()
    assert s.loc["clip", "frac_sat"] == pytest.approx(want) and want > 0.3  # its own saturation count
    assert s.loc["lin", "frac_sat"] == 0.0
    assert len(s.loc["clip", "hist"]) == 64 and len(s.loc["lin", "hist"]) == 71  # its own bins
