"""Dynamic loss scaling (torch.amp.GradScaler): gradients recorded at their true size, skipped steps
recorded as such (not merged into the next step, not a non-finite error), the wrap removed again.

The reference is the same training without a scaler: a power-of-two scale multiplies every
gradient exactly (no rounding in binary floating point), so the descaled statistics must equal
the unscaled run's, and a step the scaler skips must leave the weights exactly where a run that
never saw that batch leaves them.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normscope
from normscope.analyze import analyze_full
from normscope.collect import amp as A
from normscope.store import load

STEPS = 8
TORCH_STEP = torch.amp.GradScaler.step


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(STEPS)]


def _train(run_dir, scaler=None, boost=(), every=1, accum=1, drop=()):
    """SGD with momentum over the batches (less ``drop``); at the iterations in ``boost`` the loss is
    multiplied by 1e38, so its scaled gradients overflow float32 and the scaler skips the step."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with normscope.watch(net, run_dir, every=every):
        for i, (x, y) in enumerate(_data()):
            if i in drop:
                continue
            opt.zero_grad(set_to_none=True)
            for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
                loss = F.cross_entropy(net(xs), ys) / accum
                if i in boost:
                    loss = loss * 1e38
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
    return load(run_dir), net


def _scaler(init=2.0**10):
    return torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1000)


def _amp(run):
    sc = run.scalars
    return sc[sc.phase == "amp"].pivot(index="step", columns="name", values="value")


def _key(df):
    return df.sort_values(["step", "layer", "call", "output"]).reset_index(drop=True)


@pytest.mark.parametrize("accum", [1, 2])
def test_descaled_gradients_equal_the_unscaled_runs(tmp_path, accum):
    ref, net_ref = _train(tmp_path / "plain", accum=accum)
    got, net = _train(tmp_path / "scaled", _scaler(), accum=accum)
    a, b = _key(ref.grads), _key(got.grads)
    assert len(a) == len(b) > 0
    for col in ("norm", "rms", "max_abs"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-12, atol=0)
    assert (b["count"] == a["count"]).all() and (b.nan_count == 0).all()
    # the parameters' gradients were divided by the scaler before the step: recorded as they are
    p, q = ref.params.sort_values(["step", "param"]), got.params.sort_values(["step", "param"])
    np.testing.assert_allclose(q.grad_norm, p.grad_norm, rtol=1e-12)
    for w, v in zip(net_ref.parameters(), net.parameters()):
        assert torch.equal(w, v)
    amp = _amp(got)
    assert list(amp.index) == list(range(STEPS))
    assert (amp.loss_scale == 2.0**10).all() and (amp.skipped == 0).all() and (amp.skipped_total == 0).all()
    assert got.skipped_steps == frozenset()
    assert got.meta["amp"]["type"] == "GradScaler" and got.meta["amp"]["skipped_steps"] == 0
    assert got.meta["amp"]["growth_interval"] == 1000 and got.meta["amp"]["init_scale"] == 2.0**10
    assert "amp" not in ref.meta and not len(_amp(ref))


def test_a_skipped_step_is_its_own_step_and_moves_nothing(tmp_path):
    run, net = _train(tmp_path / "r", _scaler(), boost=(2, 5))
    _, net_ref = _train(tmp_path / "ref", drop=(2, 5))  # the batches the scaler threw away, never seen
    for w, v in zip(net_ref.parameters(), net.parameters()):
        assert torch.equal(w, v)
    assert run.meta["steps_seen"] == STEPS and run.meta["optimizer_steps"] == STEPS - 2
    assert run.skipped_steps == frozenset({2, 5}) and run.meta["amp"]["skipped_steps"] == 2
    amp = _amp(run)
    assert amp.loss_scale.tolist() == [1024, 1024, 1024, 512, 512, 512, 256, 256]  # halved after each skip
    assert amp.skipped_total.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert set(run.params.step) == set(range(STEPS)) - {2, 5}  # no norms of the step that did not happen
    g = run.grads
    assert (g[g.step == 2].inf_count + g[g.step == 2].nan_count).sum() > 0  # the overflow, recorded as it was
    assert (g[~g.step.isin([2, 5])].inf_count == 0).all()
    s = run.stats
    assert set(s[s.step == 3].call) == {0} and (s.forwards == 1).all()  # the next step is not merged with it
    a = analyze_full(run, model=net)
    assert not [f for f in a.findings if f.check == "non-finite"], a.findings
    (f,) = [f for f in a.findings if f.check == "loss-scaling"]
    # one skip in the 4 steps of the second half: a quarter of them lost, above the 5 % that warns
    assert f.severity == "warning" and f.evidence["skipped_steps"] == 2 and f.evidence["window_skip_fraction"] == 0.25
    assert "skipped 25 % of the optimizer steps over steps 4–7 (1 of 4; 2 of 8 in the whole run)" in f.message
    json.dumps(a.to_dict())


def test_skips_on_unsampled_steps_are_counted(tmp_path):
    run, _ = _train(tmp_path / "r", _scaler(), boost=(1, 4, 5), every=3)
    amp = _amp(run)
    assert list(amp.index) == [0, 3, 6]
    assert amp.skipped.tolist() == [0, 0, 0] and amp.skipped_total.tolist() == [0, 1, 3]
    assert amp.loss_scale.tolist() == [1024, 512, 128]
    assert run.skipped_steps == frozenset() and run.meta["amp"]["skipped_steps"] == 3


def test_the_wrap_lives_only_while_a_scope_does(tmp_path):
    assert torch.amp.GradScaler.step is TORCH_STEP
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    s1 = normscope.watch(a, tmp_path / "a").start()
    s2 = normscope.watch(b, tmp_path / "b").start()
    assert torch.amp.GradScaler.step is A._wrapped_step
    s1.close()
    assert torch.amp.GradScaler.step is A._wrapped_step  # the other scope still needs it
    s2.close()
    assert torch.amp.GradScaler.step is TORCH_STEP


def test_a_scaler_of_another_model_or_disabled_is_ignored(tmp_path):
    net, other = _net(), nn.Linear(6, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    on, off = _scaler(), torch.amp.GradScaler("cpu", enabled=False)
    with normscope.watch(net, tmp_path / "r") as scope:
        for x, y in _data()[:3]:
            opt.zero_grad()
            off.scale(F.cross_entropy(net(x), y)).backward()
            off.step(opt)
            off.update()
            opt_other.zero_grad()
            on.scale(F.cross_entropy(other(x), y) * 1e38).backward()  # skipped, but not this scope's optimizer
            on.step(opt_other)
            on.update()
        assert scope.step_index == 3
    run = load(tmp_path / "r")
    assert not len(_amp(run)) and "amp" not in run.meta and run.meta["optimizer_steps"] == 3


def test_recipe_amp(tmp_path):
    from normscope.errors import NormscopeError
    from normscope.probe import Recipe

    data = _data()
    for amp in ("float16", "bfloat16"):
        r = Recipe(_net(), data, F.cross_entropy, torch.optim.Adam, steps=4, amp=amp)
        run = normscope.probe(r, run_dir=tmp_path / amp)
        amp_rows = _amp(run)
        if amp == "float16":
            assert list(amp_rows.index) == [0, 1, 2, 3] and run.meta["amp"]["init_scale"] == 65536.0
        else:
            assert not len(amp_rows)
        assert len(run.grads) and np.isfinite(run.grads.norm).all()
    with pytest.raises(NormscopeError, match="Recipe.amp must be"):
        Recipe(_net(), data, F.cross_entropy, amp="fp8")
    with pytest.raises(NormscopeError, match="your own train_step"):
        Recipe(_net(), data, F.cross_entropy, amp="float16", train_step=lambda m, b, o: 0.0)


def test_skipped_steps_stay_out_of_the_report_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from normscope.integrations.tensorboard import export_tensorboard
    from reports.data import gradient_flow, train_grads

    run, _ = _train(tmp_path / "r", _scaler(), boost=(2, 5))
    assert set(train_grads(run).step) == set(range(STEPS)) - {2, 5}
    assert not set(gradient_flow(run, n_steps=STEPS)[1]) & {2, 5}
    export_tensorboard(tmp_path / "r", tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("grad/2/rms")] == [0, 1, 3, 4, 6, 7]
    assert [e.value for e in acc.Scalars("amp/loss_scale")] == [1024, 1024, 1024, 512, 512, 512, 256, 256]
