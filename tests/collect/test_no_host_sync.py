"""A sampled step on the accelerator path (the NaN-safe reducers, forced on the CPU) dispatches no op
that copies a Python value to the device (``torch.tensor(v, device=...)`` → lift_fresh: a host copy
and a stream sync on a GPU) or reads one back (``.item()`` → _local_scalar_dense), and none with a
data-dependent size: the step's single host transfer is the only sync (README, overhead)."""

import torch
from dispatch import SYNC_OPS as SYNC
from dispatch import CountOps
from torch import nn

import normscope
from normscope.collect import reducers as R


def test_masked_path_sampled_step_has_no_sync_op(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "FORCE_MASKED", True)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3))
    for p in m[1].parameters():  # frozen BN: its running-statistics drift is emitted too
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    with normscope.watch(m, tmp_path / "r", every=1, optimizer=opt, stats="standard"):
        for _ in range(2):
            with CountOps(
                short=True
            ) as c:  # forward hooks, gradient hooks, parameter norms, drift: all but the transfer
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
    assert {k: c.ops[k] for k in SYNC} == dict.fromkeys(SYNC, 0)
    run = normscope.load(tmp_path / "r")
    assert len(run.stats) and len(run.signal("bn_mean_drift")) == 2  # the step was recorded
