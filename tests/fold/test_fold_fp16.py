"""fp16 risk: a BN channel with σ² ≈ 0 gives s ≈ γ/√ε; it is reported, and never Inf."""

import torch
from fold_testlib import randomize_all
from torch import nn

from normscope.fold import fold_bn


def test_tiny_variance_channel_is_reported():
    model = randomize_all(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)), "neg_gamma"
    )
    with torch.no_grad():
        model[1].running_var[2] = 1e-8
    res = fold_bn(model, torch.randn(1, 3, 5, 5))
    assert len(res.folded) == 2
    risk = {r.bn: r for r in res.fp16_risk}
    assert risk["1"].tiny_var_channels == [2] and risk["1"].at_risk
    assert risk["1"].max_scale > abs(float(model[1].weight.detach()[2])) / (1e-5**0.5) * 0.99
    assert risk["3"].tiny_var_channels == [] and not risk["3"].at_risk
    for r in res.fp16_risk:
        assert all(map(lambda v: v == v and abs(v) < float("inf"), (r.max_abs_weight, r.max_abs_bias, r.max_scale)))
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_values_beyond_fp16_range_are_flagged():
    model = randomize_all(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=1e-12)), "neg_gamma")
    with torch.no_grad():
        model[1].running_var[0] = 0.0
        model[1].weight[0] = 1.0
        model[0].weight[0] = 1.0
    res = fold_bn(model, torch.randn(2, 3))
    (r,) = res.fp16_risk
    assert r.exceeds_fp16 and r.max_abs_weight > 65504
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    d = res.to_dict()
    assert d["fp16_risk"][0]["exceeds_fp16"] is True


def test_fp16_model_fold_is_finite_or_refused():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-12)), "neg_gamma")
    with torch.no_grad():
        model[1].running_var.fill_(1e-12)
    model = model.half()
    res = fold_bn(model, torch.randn(1, 3, 2, 2).half(), verify=False)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.folded == [] and "not finite in float16" in res.skipped[0].reason
