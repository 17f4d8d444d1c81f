"""Bug: on a ``torch.jit.script``/``trace`` model nothing was folded, ``skipped`` was empty and
``all_folded`` was True. Now the model is refused with a reason, per BN where they can be named."""

import pytest
import torch
from fold_testlib import randomize_all
from torch import nn

from normscope.fold import fold_bn


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("how", ["script", "trace", "scripted_child"])
def test_jit_models_are_refused(how):
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "neg_gamma")
    x = torch.randn(1, 3, 5, 5)
    if how == "script":
        target = torch.jit.script(model)
    elif how == "trace":
        target = torch.jit.trace(model, x)
    else:
        target = nn.Sequential(torch.jit.script(model), nn.Identity())
    res = fold_bn(target, x)
    assert not res.all_folded and res.folded == []
    assert res.skipped and all("torch.jit" in s.reason for s in res.skipped)
    assert [s.bn for s in res.skipped] == (["1"] if how != "scripted_child" else ["0.1"])
    with torch.no_grad():
        assert torch.equal(res.model(x), target(x))
