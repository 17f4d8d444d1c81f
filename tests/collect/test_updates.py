"""‖Δw‖ read back from the optimizer's state (normscope/collect/updates.py) against the brute-force
truth: a float64 copy of every weight before each step, subtracted after it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from normscope import watch
from normscope.collect import native
from normscope.collect import updates as U
from normscope.collect.params import ParamTracker
from normscope.store import load

CONFIGS = [
    (torch.optim.SGD, dict(lr=0.05)),
    (torch.optim.SGD, dict(lr=0.05, weight_decay=0.02)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.02, dampening=0.1)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.03, maximize=True)),
    (torch.optim.SGD, dict(lr=0.05, weight_decay=0.02, maximize=True, foreach=False)),
    (torch.optim.SGD, dict(lr=torch.tensor(0.05), momentum=0.9, fused=True)),
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01, foreach=False)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-4, fused=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.AdamW, dict(lr=1e-2)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.3, amsgrad=True, foreach=False)),
    (torch.optim.AdamW, dict(lr=torch.tensor(3e-3), weight_decay=0.05, betas=(0.9, 0.98))),
]


def _ids(c):
    return f"{c[0].__name__}-" + "-".join(f"{k}={v}" for k, v in c[1].items())


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(20, 700, dtype=dtype)  # 14,000 weights: past a kernel block, several lanes
        self.b = nn.Linear(700, 3, dtype=dtype)
        self.unused = nn.Linear(3, 3, dtype=dtype)  # in the optimizer, never gets a gradient
        self.frozen = nn.Parameter(torch.ones(5, dtype=dtype), requires_grad=False)
        self.outside = nn.Parameter(torch.ones(4, dtype=dtype))  # not in the optimizer, gets a gradient

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + self.outside.sum()


def _run(cls, kw, steps=4, dtype=torch.float32, hook=None):
    """(tracked 3 x P squared norms per step, true ‖Δw‖² per step, tracker)."""
    torch.manual_seed(0)
    net = Net(dtype)
    opt = cls([p for n, p in net.named_parameters() if n not in ("frozen", "outside")], **kw)
    if hook is not None:
        opt.register_step_post_hook(hook)
    tr = ParamTracker(net)
    got, want = [], []
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(32, 20, dtype=dtype)).square().mean().backward()
        before = [p.detach().double().clone() for p in net.parameters()]
        tr.before_step(opt)
        opt.step()
        tr.after_step(True)
        got.append(tr.take().view(3, -1)[2].numpy())
        chk = tr.take_check()  # (the scope reads it with the step's transfer)
        if chk is not None:
            tr.checked(float(chk))
        want.append(
            np.array([float((p.detach().double() - b).square().sum()) for p, b in zip(net.parameters(), before)])
        )
    return np.array(got), np.array(want), tr


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_update_norms_from_the_optimizer_state_equal_the_weights_change(config, kernel, monkeypatch):
    if kernel:
        assert native.KERNEL is not None, native.STATE
    else:
        monkeypatch.setattr(native, "KERNEL", None)
    cls, kw = config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want, tr = _run(cls, kw)
    assert tr.update_source == f"{cls.__name__} state" and tr._snap is None
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-20)
    names = [n for n, _ in Net().named_parameters()]
    for n in ("unused.weight", "unused.bias", "frozen", "outside"):
        assert (got[:, names.index(n)] == 0).all()
    assert (got[:, names.index("a.weight")] > 0).all()


def test_float64_parameters_take_the_torch_path_and_agree():
    got, want, tr = _run(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), dtype=torch.float64)
    assert tr.update_source == "AdamW state"
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-30)


def test_the_kernel_and_the_torch_slices_agree_on_every_kind(monkeypatch):
    """step_sq_norms' update kinds against the sliced torch algebra (slices shrunk so a tensor
    spans several), with the weights' and the gradients' norms of the same pass against numpy."""
    assert native.KERNEL is not None, native.STATE
    monkeypatch.setattr(U, "_SLICE", 1000)
    g = torch.Generator().manual_seed(3)
    w, t1, t2, gr = (torch.randn(12_345, generator=g) for _ in range(4))
    t2 = t2.abs()
    for term in [(0, t1, None, -0.1, 0.0, 1.0, 0.0, 0.0), (0, t1, t2, -0.1, -0.05, 1.0, 0.0, 0.003),
                 (1, t1, t2, -0.02, 0.0, 0.7, 1e-3, 0.0), (1, t1, t2, -0.02, 0.0, 0.3, 1e-8, 0.01)]:  # fmt: skip
        ref = float(U.delta(w, term).square().sum())  # float64
        for grads in ([gr], None):
            k = U.step_sq_norms([w], grads, [term])
            assert float(k[2, 0]) == pytest.approx(ref, rel=1e-6)
            assert float(k[0, 0]) == pytest.approx(float(w.double().square().sum()), rel=1e-6)
            assert float(k[1, 0]) == (pytest.approx(float(gr.double().square().sum()), rel=1e-6) if grads else 0.0)
        assert float(U._sq_sliced(w, term)) == pytest.approx(ref, rel=1e-5)
    # another kind of tensor anywhere: declined, not read
    assert U.step_sq_norms([w.double()], None, [None]) is None
    assert U.step_sq_norms([w], [gr.double()], [None]) is None
    assert U.step_sq_norms([w], None, [(0, t1[:-1], None, -0.1, 0.0, 1.0, 0.0, 0.0)]) is None


def test_step_norms_of_a_parameter_list_in_one_pass_match_numpy():
    """The tracker's kinds in one call, read last-first, returned in the list's order: a copy
    before the step (kind 2), Δ = a·g from this pass's gradient norm or from the norms taken
    before (kind 3), Δ = 0, unknown (NaN), and a missing gradient (NaN)."""
    assert native.KERNEL is not None, native.STATE
    g = torch.Generator().manual_seed(4)
    sizes = (1, 15, 16, 17, 4097, 300_001)
    ws = [torch.randn(n, generator=g) * 2 for n in sizes]
    gs = [torch.randn(n, generator=g) for n in sizes]
    snap = [w + torch.randn(w.shape, generator=g) * 1e-2 for w in ws]
    gs[4] = None
    terms = [(2, snap[0], None, 0.0, 0.0, 1.0, 0.0, 0.0), (3, None, None, -0.5, 0.0, 1.0, 0.0, 0.0), None, U.UNKNOWN,
             (2, snap[4], None, 0.0, 0.0, 1.0, 0.0, 0.0), (0, snap[5], None, -0.1, 0.0, 1.0, 0.0, 0.0)]  # fmt: skip

    def sq(t):
        return float(np.sum(t.numpy().astype(np.float64) ** 2))

    out = U.step_sq_norms(ws, gs, terms).numpy()
    np.testing.assert_allclose(out[0], [sq(w) for w in ws], rtol=1e-6)
    np.testing.assert_allclose(out[1], [math.nan if t is None else sq(t) for t in gs], rtol=1e-6)
    want = [sq(snap[0] - ws[0]), 0.25 * sq(gs[1]), 0.0, math.nan, sq(snap[4] - ws[4]), 0.01 * sq(snap[5])]
    np.testing.assert_allclose(out[2], want, rtol=1e-5)
    # without the gradients: kind 3 scales the norms taken before the step; none given: declined
    before = torch.tensor([7.0, 9.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = U.step_sq_norms(ws, None, terms, before).numpy()
    assert out[2, 1] == pytest.approx(0.25 * 9.0) and (out[1] == 0).all()
    assert U.step_sq_norms(ws, None, terms) is None


def test_a_hook_that_changes_the_weights_is_caught_and_the_snapshot_takes_over():
    """A per-optimizer post hook (weight clipping, as in WGAN) runs before normscope's: the
    weights' change is no longer the optimizer's update. The first check sees it; that step's
    ‖Δw‖ is NaN, and every later one is measured against the snapshot, exactly."""

    def clip(opt, args, kwargs):
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    p.clamp_(-0.02, 0.02)

    with pytest.warns(RuntimeWarning, match="could not be read from the SGD optimizer's state"):
        got, want, tr = _run(torch.optim.SGD, dict(lr=0.05, momentum=0.9), hook=clip)
    assert tr.update_source.startswith("weight snapshot (the SGD state disagreed")
    assert np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-5, atol=1e-20)


def _run_rows(opt, net, steps, hook=None):
    """All three rows (‖w‖, ‖∇w‖, ‖Δw‖, squared) per step from a ParamTracker, against float64
    references taken around the step; ``deferred``: steps whose gradient norms waited for it."""
    if hook is not None:
        opt.register_step_post_hook(hook)
    tr = ParamTracker(net)
    got, want, deferred = [], [], []
    g = torch.Generator().manual_seed(9)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(32, 20, generator=g)).square().mean().backward()
        before = [p.detach().double().clone() for p in net.parameters()]
        gsq = [float(p.grad.double().square().sum()) if p.grad is not None else math.nan for p in net.parameters()]
        tr.before_step(opt)
        deferred.append(tr._grad_norms is None)
        opt.step()
        tr.after_step(True)
        got.append(tr.take().view(3, -1).numpy())
        chk = tr.take_check()
        if chk is not None:
            tr.checked(float(chk))
        ws = [float(p.detach().double().square().sum()) for p in net.parameters()]
        du = [float((p.detach().double() - b).square().sum()) for p, b in zip(net.parameters(), before)]
        want.append(np.array([ws, gsq, du]))
    return np.array(got), np.array(want), deferred, tr


@pytest.mark.parametrize(
    "cls,kw",
    [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.SGD, dict(lr=0.05, weight_decay=0.02)),
     (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)), (torch.optim.Adam, dict(lr=1e-2, maximize=True))],
    ids=["sgd-momentum", "sgd-plain", "adamw", "adam-maximize"],
)  # fmt: skip
def test_gradient_norms_read_after_the_step_with_the_weights_equal_the_norms_before_it(cls, kw):
    """Torch's per-tensor step never writes p.grad: past the first two (checked) updates the
    gradient norms are read after the step, in the weights' pass, and equal those before it."""
    assert native.KERNEL is not None, native.STATE
    torch.manual_seed(0)
    net = Net()
    opt = cls([p for n, p in net.named_parameters() if n not in ("frozen", "outside")], **kw)
    got, want, deferred, tr = _run_rows(opt, net, steps=5)
    assert deferred == [False, False, True, True, True] and tr.update_source == f"{cls.__name__} state"
    np.testing.assert_allclose(got[:, :2], want[:, :2], rtol=2e-6, equal_nan=True)
    np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=2e-5, atol=1e-20)
    names = [n for n, _ in net.named_parameters()]
    assert np.isnan(got[:, 1, names.index("unused.weight")]).all()  # no gradient: NaN, not 0


def test_a_step_that_writes_the_gradients_is_caught_before_they_are_read_after_it():
    """Regression guard for the deferred gradient norms: an optimizer whose step changes p.grad
    (here a post hook halving it, as an optimizer that rescales its gradients in place would)
    must not have them read after the step. The first check compares the probed gradients, hands
    the run to the weight snapshot (which takes them before the step), and every norm is right."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def halve(opt, args, kwargs):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)

    with pytest.warns(RuntimeWarning, match="step\\(\\) changed the gradient"):
        got, want, deferred, tr = _run_rows(opt, net, steps=4, hook=halve)
    assert not any(deferred) and tr.update_source.startswith("weight snapshot (the SGD state disagreed")
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=2e-6, equal_nan=True)
    np.testing.assert_allclose(got[1:, 2], want[1:, 2], rtol=2e-5, atol=1e-20)


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-2))],
                         ids=["sgd-momentum", "adamw"])  # fmt: skip
def test_a_non_finite_gradient_is_no_disagreement_of_the_algebra(cls, kw):
    """Regression: a NaN in a gradient at a check step read as "step() changed the gradient from nan
    to nan" (NaN != NaN) and handed a diverging run to the weight copy, with a warning. A value left
    NaN is left alone, and a NaN update predicted for NaN weights agrees: no warning, the state keeps
    serving, the poisoned parameter's ‖Δw‖ is NaN and every other one exact."""
    torch.manual_seed(0)
    net = Net()
    opt = cls([p for n, p in net.named_parameters() if n not in ("frozen", "outside")], **kw)
    net.b.weight.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), math.nan))  # column 0: probed elements
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, want, _, tr = _run_rows(opt, net, steps=3)
    assert tr.update_source == f"{cls.__name__} state"
    names = [n for n, _ in net.named_parameters()]
    bad = names.index("b.weight")
    assert np.isnan(got[:, 2, bad]).all() and np.isnan(want[:, 2, bad]).all()
    keep = [i for i in range(len(names)) if i != bad and names[i] != "b.bias"]
    np.testing.assert_allclose(got[:, 2, keep], want[:, 2, keep], rtol=2e-5, atol=1e-20)


def test_a_nan_gradient_the_step_removes_is_still_a_change():
    """The NaN-left-NaN rule does not hide a step that drops p.grad: a removed gradient (NaN before)
    is a change, caught by the check, and the weight copy takes over."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD([p for n, p in net.named_parameters() if n not in ("frozen", "outside")], lr=0.05)
    net.b.weight.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), math.nan))

    def drop(opt, args, kwargs):
        net.b.weight.grad = None

    with pytest.warns(RuntimeWarning, match="step\\(\\) changed the gradient from nan"):
        _, _, _, tr = _run_rows(opt, net, steps=2, hook=drop)
    assert tr.update_source.startswith("weight snapshot (the SGD state disagreed")


def test_multi_tensor_and_fused_steps_keep_the_gradient_norms_before_the_step():
    net = Net()
    for kw in (dict(foreach=True), dict(fused=True)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, **kw)
        assert not U.OptimizerUpdate(opt).keeps_grads()
    assert U.OptimizerUpdate(torch.optim.SGD(net.parameters(), lr=0.05)).keeps_grads()
    # a parameter off the CPU takes torch's multi-tensor step by default there: not kept
    off = nn.Parameter(torch.empty(3, device="meta"))
    assert not U.OptimizerUpdate(torch.optim.SGD([*net.parameters(), off], lr=0.05)).keeps_grads()


def test_other_optimizers_and_unreadable_settings_take_the_snapshot():
    class MySGD(torch.optim.SGD):  # a subclass may step otherwise: never read
        pass

    for cls, kw, source in [
        (torch.optim.RMSprop, dict(lr=1e-3), "weight snapshot"),
        (MySGD, dict(lr=0.05), "weight snapshot"),
    ]:
        got, want, tr = _run(cls, kw, steps=2)
        assert tr.update_source == source
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-20)
    # settings whose step the algebra does not cover: the copy is taken before the step
    net = Net()
    net(torch.randn(2, 20)).sum().backward()
    for opt, why in [(torch.optim.Adam(net.parameters(), differentiable=True), "differentiable=True"),
                     (torch.optim.SGD(net.parameters(), lr=torch.tensor([0.1])[0].expand(())), None)]:  # fmt: skip
        tr = ParamTracker(net)
        tr.before_step(opt)
        assert (tr._snap is not None) == (why is not None)
        assert tr.update_source == (f"weight snapshot ({type(opt).__name__}: {why})" if why else "SGD state")


def _closure(model, opt, x):
    """A step closure: zero the gradients, recompute the loss and its gradients."""

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return closure


def test_a_closure_and_half_precision_parameters_take_the_snapshot():
    """A closure recomputes the gradients inside step(), after the pre-hook read them; float16 /
    bfloat16 weights lose updates below half a unit in the last place, so their real change is
    the one to record (here: lr so small that most bfloat16 weights do not move at all)."""
    torch.manual_seed(0)
    net = nn.Linear(8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    closure = _closure(net, opt, torch.randn(4, 8))
    closure()
    tr = ParamTracker(net)
    before = [p.detach().clone() for p in net.parameters()]
    tr.before_step(opt, closure=True)
    opt.step(closure)
    tr.after_step(True)
    assert tr.update_source == "weight snapshot (SGD: a closure recomputes the gradients inside step())"
    want = [float((p.detach() - b).square().sum()) for p, b in zip(net.parameters(), before)]
    np.testing.assert_allclose(tr.take().view(3, -1)[2].numpy(), want, rtol=1e-5)

    half = nn.Linear(64, 64).to(torch.bfloat16)
    opt = torch.optim.SGD(half.parameters(), lr=1e-5)
    half(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().mean().backward()
    tr = ParamTracker(half)
    before = [p.detach().float().clone() for p in half.parameters()]
    tr.before_step(opt)
    opt.step()
    tr.after_step(True)
    assert tr.update_source == "weight snapshot (SGD: torch.bfloat16 parameters)"
    real = [float((p.detach().float() - b).square().sum()) for p, b in zip(half.parameters(), before)]
    intended = [float((1e-5 * p.grad.float()).square().sum()) for p in half.parameters()]
    np.testing.assert_allclose(tr.take().view(3, -1)[2].numpy(), real, rtol=1e-2)
    assert real[0] < 0.5 * intended[0]  # most of the intended update was lost to rounding


def test_untracked_updates_say_so_and_copy_nothing():
    net = Net()
    net(torch.randn(2, 20)).sum().backward()
    tr = ParamTracker(net, track_updates=False)
    for opt in (torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.RMSprop(net.parameters())):
        tr.before_step(opt)
        opt.step()
        tr.after_step(True)
        assert tr._snap is None and tr.update_source == "not measured (track_updates=False)"
        assert torch.isnan(tr.take().view(3, -1)[2]).all()


def test_the_check_runs_on_the_first_two_updates_then_every_verify_every(monkeypatch):
    calls = []
    real = U.OptimizerUpdate.probe
    monkeypatch.setattr(
        U.OptimizerUpdate, "probe", lambda self, w, g=None: (calls.append(self.updates), real(self, w, g))
    )
    monkeypatch.setattr(U, "VERIFY_EVERY", 3)
    _run(torch.optim.SGD, dict(lr=0.05, momentum=0.9), steps=7)
    assert calls == [0, 1, 3, 6]


def test_a_watched_adamw_run_records_exact_update_norms_without_a_copy(tmp_path, monkeypatch):
    copies = []
    monkeypatch.setattr(ParamTracker, "_take_snapshot", lambda self, params: copies.append(1))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    want = {}
    with watch(model, tmp_path / "r", every=2, optimizer=opt):
        for step in range(5):
            opt.zero_grad()
            model(torch.randn(16, 6)).square().mean().backward()
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            opt.step()
            want[step] = {n: float((p.detach().double() - before[n]).norm()) for n, p in model.named_parameters()}
    run = load(tmp_path / "r")
    assert not copies and run.meta["update_norms"] == "AdamW state"
    assert sorted(run.params.step.unique()) == [0, 2, 4]
    for r in run.params.itertuples():
        assert r.update_norm == pytest.approx(want[r.step][r.param], rel=1e-5) and r.update_norm > 0
    assert not run.params.update_norm.isna().any()


def test_a_watched_step_with_a_closure_is_measured_against_a_copy(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    closure = _closure(model, opt, torch.randn(8, 6))
    with watch(model, tmp_path / "c", every=1, optimizer=opt):
        closure()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step(closure)
    run = load(tmp_path / "c")
    assert run.meta["update_norms"].startswith("weight snapshot (SGD: a closure")
    for r in run.params.itertuples():
        assert r.update_norm == pytest.approx(float((dict(model.named_parameters())[r.param].detach()
                                                     - before[r.param]).norm()), rel=1e-5)  # fmt: skip


@pytest.mark.parametrize("kernel", [True, False])
def test_sq_norms_read_last_first_keep_the_list_order(kernel, monkeypatch):
    """The post-step norms read the list from its end (cache hits after the optimizer's walk); the
    result must still be in the list's order, on the kernel and on the torch path."""
    if kernel:
        assert native.KERNEL is not None, native.STATE
    else:
        monkeypatch.setattr(native, "KERNEL", None)
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) * (k + 1) for k, n in enumerate((3, 1000, 17, 4096, 1))]
    want = torch.tensor([float(t.double().pow(2).sum()) for t in ts], dtype=torch.float64)
    for last_first in (False, True):
        got = U.sq_norms_of(ts, kernel_ok=True, last_first=last_first)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
