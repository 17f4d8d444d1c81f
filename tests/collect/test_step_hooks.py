"""The modules' hooks are attached for sampled steps only (normscope/collect/step_hooks.py): an
unsampled step runs every module hook-free, as the bare step does; sampled steps record what they
recorded with the hooks always on."""

from __future__ import annotations

import copy

import models
import numpy as np
import torch
from torch import nn

from normscope import load, watch
from normscope.collect.step_hooks import StepHooks


def module_hooks(model: nn.Module) -> int:
    """Forward (pre-)hooks on every module but the root."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules() if n)


def _train_steps(model, steps, seen):
    torch.manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        # hooks in place while this step's forward runs (read at the root, which keeps its hooks)
        h = model.register_forward_pre_hook(lambda m, a: seen.append(module_hooks(model)))
        out = model(torch.randn(4, 3, 8, 8))
        h.remove()
        opt.zero_grad()
        out.pow(2).mean().backward()
        opt.step()


def test_unsampled_steps_run_the_modules_hook_free_and_sampled_steps_record_the_same(tmp_path):
    torch.manual_seed(0)
    base = models.TinyResNet()
    always, toggled = copy.deepcopy(base), copy.deepcopy(base)
    with watch(always, tmp_path / "a", every=1):
        _train_steps(always, 6, [])
    seen: list[int] = []
    with watch(toggled, tmp_path / "t", every=3) as scope:
        n = scope.hook_count
        _train_steps(toggled, 6, seen)
        assert scope.hook_count == n  # detached, never forgotten
    assert module_hooks(toggled) == 0  # closed: nothing left
    on = seen[0]
    assert on > 10 and seen == [on, 0, 0, on, 0, 0]
    a, t = load(tmp_path / "a"), load(tmp_path / "t")
    assert t.steps == [0, 3]
    for table in ("stats", "grads"):
        ea, et = getattr(a, table), getattr(t, table)
        ea = ea[ea.step.isin([0, 3])].sort_values(["step", "layer", "call", "output"]).reset_index(drop=True)
        et = et.sort_values(["step", "layer", "call", "output"]).reset_index(drop=True)
        assert len(et) and list(ea.layer) == list(et.layer)
        for col in ("mean", "std") if table == "stats" else ("norm", "max_abs"):
            np.testing.assert_allclose(et[col], ea[col], rtol=1e-6)


def test_a_failed_half_registration_is_rolled_back():
    hooks = StepHooks()
    m1, m2 = nn.Linear(2, 2), nn.Linear(2, 2)
    hooks.attach()
    hooks.add(m1, lambda *a: None)
    hooks.add(m2, lambda *a: None, pre=True)
    hooks.add(m2, lambda *a, **k: None, pre=True, with_kwargs=True)
    assert len(m2._forward_pre_hooks) == 2 and len(hooks) == 3
    hooks.truncate(1)
    assert len(m2._forward_pre_hooks) == 0 and len(m1._forward_hooks) == 1 and len(hooks) == 1
    hooks.detach()
    assert len(m1._forward_hooks) == 0
    hooks.pin()
    hooks.detach()  # pinned: stays attached
    assert len(m1._forward_hooks) == 1
    hooks.clear()
    assert len(m1._forward_hooks) == 0 and len(hooks) == 0
