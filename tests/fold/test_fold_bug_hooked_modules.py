"""Bug: a conv or BN with a forward hook before a BN was folded: the hook then saw (or changed)
a different tensor, and the model was wrong. Now such pairs are refused, naming the module and the
hook, before anything changes; the output is unchanged."""

import pytest
import torch
from fold_testlib import both_paths, randomize_all
from torch import nn

from normscope.fold import fold_bn


def _double(mod, inputs, out):
    return out * 2


def _shift(mod, inputs):
    return (inputs[0] + 1,)


@pytest.mark.parametrize("where", ["conv_forward_hook", "bn_pre_hook", "bn_forward_hook"])
def test_hooked_pair_is_refused_by_name(where):
    base = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "neg_gamma")
    if where == "conv_forward_hook":
        base[0].register_forward_hook(_double)
    elif where == "bn_pre_hook":
        base[1].register_forward_pre_hook(_shift)
    else:
        base[1].register_forward_hook(_double)
    x = torch.randn(2, 3, 6, 6)
    for path, model in both_paths(base):
        res = fold_bn(model, x)
        assert res.tracing == path
        assert res.folded == [] and len(res.skipped) == 1
        reason = res.skipped[0].reason
        assert ("_double" in reason or "_shift" in reason) and "hook" in reason
        assert ("'0'" in reason or "'inner.0'" in reason) if where == "conv_forward_hook" else "1'" in reason
        with torch.no_grad():
            assert torch.equal(res.model(x), model(x))


def test_global_forward_hook_is_refused():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "neg_gamma")
    handle = torch.nn.modules.module.register_module_forward_hook(_double)
    try:
        res = fold_bn(model, torch.randn(1, 3, 5, 5))
    finally:
        handle.remove()
    assert res.folded == [] and "global module forward hook" in res.skipped[0].reason
