"""On an unsampled step normscope's hooks return before any tensor operation: the step dispatches
exactly the operations of the same step without normscope (counted with a TorchDispatchMode)."""

import copy
from collections import Counter

import models
import pytest
import torch
from dispatch import CountOps

from normscope import watch


def step_ops(model, opt, x, y) -> Counter:
    with CountOps() as c:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return c.ops


@pytest.mark.parametrize("stats", ["minimal", "standard"])
def test_unsampled_step_dispatches_no_tensor_op(tmp_path, stats):
    torch.manual_seed(0)
    bare = models.TinyResNet()
    watched = copy.deepcopy(bare)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=False) for m in (bare, watched)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    with watch(watched, tmp_path / "r", every=3, stats=stats) as scope:
        sampled = [step_ops(m, o, x, y) for m, o in ((bare, opts[0]), (watched, opts[1]))]  # step 0: sampled
        unsampled = [step_ops(m, o, x, y) for m, o in ((bare, opts[0]), (watched, opts[1]))]  # step 1
        assert scope.step_index == 2
    # the counter sees the hooks' operations when they run (the comparison below can fail) ...
    assert sum(sampled[1].values()) > sum(sampled[0].values())
    # ... and an unsampled step adds none: forward hooks, sentinels, root and optimizer hooks all return first
    assert unsampled[1] == unsampled[0]
