"""What must not fold is refused with a reason, and the output stays exactly the same."""

import copy

import pytest
import torch
from fold_testlib import randomize_all, rel_err
from torch import nn

from normscope.errors import NormscopeError
from normscope.fold import fold_bn


def _same(res, model, x):
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = res.model(x)
    return torch.equal(a, b)


def test_training_mode_bn_is_refused():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "neg_gamma").train()
    before = copy.deepcopy(model.state_dict())
    res = fold_bn(model, torch.randn(2, 3, 5, 5))
    assert res.folded == [] and "training mode" in res.skipped[0].reason
    for k, v in model.state_dict().items():  # the error check ran on copies: stats untouched
        assert torch.equal(v, before[k])


def test_track_running_stats_false_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 5, 5)
    res = fold_bn(model, x)
    assert res.folded == [] and "track_running_stats=False" in res.skipped[0].reason
    assert _same(res, model, x)


def test_relu_between_is_not_folded():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()), "neg_gamma")
    x = torch.randn(2, 3, 5, 5)
    res = fold_bn(model, x)
    assert res.folded == [] and "ReLU" in res.skipped[0].reason
    assert _same(res, model, x)


def test_zero_padding_refuse_option():
    model = randomize_all(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), "neg_gamma")
    x = torch.randn(1, 4, 5, 5)
    res = fold_bn(model, x, zero_padding="refuse")
    assert res.folded == [] and "zero padding" in res.skipped[0].reason
    with pytest.raises(NormscopeError):
        fold_bn(model, x, zero_padding="maybe")


def test_zero_gamma_cannot_pre_add():
    model = randomize_all(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), "neg_gamma")
    with torch.no_grad():
        model[0].weight[2] = 0.0
    x = torch.randn(1, 4, 5, 5)
    res = fold_bn(model, x)
    assert res.folded == [] and "γ = 0" in res.skipped[0].reason
    assert _same(res, model, x)


def test_zero_gamma_folds_into_producer():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "neg_gamma").double()
    with torch.no_grad():
        model[1].weight[2] = 0.0
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    res = fold_bn(model, x)
    assert len(res.folded) == 1 and res.error.max_rel <= 1e-12


def test_non_finite_fold_is_refused():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0)), "neg_gamma")
    with torch.no_grad():
        model[1].running_var[1] = 0.0
    res = fold_bn(model, torch.randn(1, 3, 5, 5))
    assert res.folded == [] and "non-finite" in res.skipped[0].reason
    for p in res.model.parameters():
        assert torch.isfinite(p).all()


def test_overflow_in_model_dtype_is_refused():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-30)), "neg_gamma")
    with torch.no_grad():
        model[1].running_var.fill_(1e-40)  # float32: s ≈ γ·1e15; with |W| ~ 1e30 it overflows
        model[0].weight.mul_(1e30)
    res = fold_bn(model, torch.randn(1, 3, 5, 5))
    assert res.folded == [] and "not finite in float32" in res.skipped[0].reason
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_custom_bn_subclass_is_not_folded():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4)), "neg_gamma")
    x = torch.randn(1, 3, 5, 5)
    res = fold_bn(model, x)
    assert res.folded == [] and "overrides" in res.skipped[0].reason
    assert rel_err(model(x), res.model(x)) == 0


def test_bn_reused_at_two_sites():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + torch.relu(self.bn(torch.relu(self.b(x))))

    model = randomize_all(Reuse(), "neg_gamma").double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    res = fold_bn(model, x)
    assert [p.bn for p in res.folded] == ["bn"] and [s.bn for s in res.skipped] == ["bn"]
    assert res.folded[0].site != res.skipped[0].site
    assert rel_err(model(x), res.model(x)) <= 1e-12
    res = fold_bn(model, x, inplace=True)  # swapping the module out would change the other site
    assert res.folded == [] and any("2 sites" in s.reason for s in res.skipped)


def test_weight_read_directly_forces_a_copy():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)) + x @ self.fc.weight

    model = randomize_all(Tied(), "neg_gamma").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    res = fold_bn(model, x)
    assert res.folded[0].copy_of == "fc"
    assert rel_err(model(x), res.model(x)) <= 1e-12


def test_bad_arguments():
    with pytest.raises(NormscopeError, match="nn.Module"):
        fold_bn("not a model", torch.randn(1))
    with pytest.raises(NormscopeError, match="example_inputs"):
        fold_bn(nn.Linear(2, 2), None)
