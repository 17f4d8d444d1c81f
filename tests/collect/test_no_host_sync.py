"""A sampled step on the accelerator path (the NaN-safe reducers, forced on the CPU) dispatches no op
that copies a Python value to the device (``torch.tensor(v, device=...)`` → lift_fresh: a host copy
and a stream sync on a GPU) or reads one back (``.item()`` → _local_scalar_dense), and none with a
data-dependent size: the step's single host transfer is the only sync (README, overhead)."""

import pytest
import torch
from dispatch import SYNC_OPS as SYNC
from dispatch import CountOps
from torch import nn

import normscope
from normscope.collect import reducers as R


@pytest.mark.parametrize("adamw", [False, True], ids=["sgd", "adamw"])
def test_masked_path_sampled_step_has_no_sync_op(tmp_path, monkeypatch, adamw):
    """Both ways of reading ‖Δw‖ from the optimizer's state (a scaled gradient norm for plain SGD,
    the element-wise Adam algebra for AdamW), and its check against the weights on the first two
    updates: no sync either."""
    monkeypatch.setattr(R, "FORCE_MASKED", True)

    def setup():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(288, 3))  # fmt: skip
        for p in m[1].parameters():  # frozen BN: its running-statistics drift is emitted too
            p.requires_grad_(False)
        trainable = [p for p in m.parameters() if p.requires_grad]
        return m, torch.optim.AdamW(trainable, lr=0.01) if adamw else torch.optim.SGD(trainable, lr=0.01)

    def step(m, opt):
        # forward hooks, gradient hooks, parameter norms, drift: all but the transfer
        with CountOps(short=True) as c:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return {k: c.ops[k] for k in SYNC}

    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    m, opt = setup()
    bare = [step(m, opt) for _ in range(2)]  # torch's Adam reads its host step counters itself
    m, opt = setup()
    with normscope.watch(m, tmp_path / "r", every=1, optimizer=opt, stats="standard"):
        watched = [step(m, opt) for _ in range(2)]  # both steps check the optimizer-state algebra
    assert watched == bare
    if not adamw:
        assert bare[0] == dict.fromkeys(SYNC, 0)
    run = normscope.load(tmp_path / "r")
    assert run.meta["update_norms"] == ("AdamW state" if adamw else "SGD state")
    assert (run.params[run.params.requires_grad].update_norm > 0).all()
    assert len(run.stats) and len(run.signal("bn_mean_drift")) == 2  # the step was recorded
