"""The pure folding formulas against direct float64 evaluation (hypothesis over layouts)."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normscope.fold import formulas as fm


def _bn(c, g):
    mean, var = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    gamma, beta = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    return mean, var, gamma, beta


def _apply_bn(x, mean, var, gamma, beta, eps=1e-5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * gamma.view(shape) + beta.view(shape)


layouts = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2))


@settings(max_examples=30, deadline=None)
@given(layouts, st.integers(0, 1000))
def test_conv_and_conv_transpose_producer(layout, seed):
    groups, cin_g, cout_g, k, stride = layout
    g = torch.Generator().manual_seed(seed)
    cin, cout = groups * cin_g, groups * cout_g
    x = torch.randn(2, cin, 6, generator=g, dtype=torch.float64)
    mean, var, gamma, beta = _bn(cout, g)
    s, t = fm.bn_scale_shift(mean, var, 1e-5, gamma, beta)
    w = torch.randn(cout, cin_g, k, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    w2, b2 = fm.fold_into_producer(w, b, s, t, "conv", groups)
    ref = _apply_bn(F.conv1d(x, w, b, stride, groups=groups), mean, var, gamma, beta)
    torch.testing.assert_close(F.conv1d(x, w2, b2, stride, groups=groups), ref, rtol=1e-12, atol=1e-12)
    wt = torch.randn(cin, cout_g, k, generator=g, dtype=torch.float64)
    w2, b2 = fm.fold_into_producer(wt, None, s, t, "convT", groups)
    ref = _apply_bn(F.conv_transpose1d(x, wt, None, stride, groups=groups), mean, var, gamma, beta)
    torch.testing.assert_close(F.conv_transpose1d(x, w2, b2, stride, groups=groups), ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(layouts, st.integers(0, 1000))
def test_conv_consumer_and_pre_add(layout, seed):
    groups, cin_g, cout_g, k, stride = layout
    g = torch.Generator().manual_seed(seed)
    cin, cout = groups * cin_g, groups * cout_g
    x = torch.randn(2, cin, 7, generator=g, dtype=torch.float64)
    mean, var, gamma, beta = _bn(cin, g)
    s, t = fm.bn_scale_shift(mean, var, 1e-5, gamma, beta)
    w = torch.randn(cout, cin_g, k, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    y = _apply_bn(x, mean, var, gamma, beta)
    w2, b2 = fm.fold_into_consumer(w, b, s, t, "conv", groups)
    torch.testing.assert_close(
        F.conv1d(x, w2, b2, stride, groups=groups), F.conv1d(y, w, b, stride, groups=groups), rtol=1e-11, atol=1e-11
    )
    pad = k // 2  # zero padding: only the scale folds; the shift stays as an add before the conv
    w3 = fm.scale_consumer_input(w, s, "conv", groups)
    a = fm.pre_add_shift(s, t).view(1, -1, 1)
    torch.testing.assert_close(
        F.conv1d(x + a, w3, b, stride, pad, groups=groups),
        F.conv1d(y, w, b, stride, pad, groups=groups),
        rtol=1e-10,
        atol=1e-10,
    )


def test_linear_through_flatten():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64)
    mean, var, gamma, beta = _bn(4, g)
    s, t = fm.bn_scale_shift(mean, var, 1e-5, gamma, beta)
    w = torch.randn(6, 40, generator=g, dtype=torch.float64)
    w2, b2 = fm.fold_into_consumer(w, None, s, t, "linear", repeat=10)
    ref = F.linear(_apply_bn(x, mean, var, gamma, beta).flatten(1), w)
    torch.testing.assert_close(F.linear(x.flatten(1), w2, b2), ref, rtol=1e-12, atol=1e-12)


def test_affine_false_defaults():
    s, t = fm.bn_scale_shift(torch.tensor([1.0]), torch.tensor([3.0]), 1.0)
    assert torch.allclose(s, torch.tensor([0.5], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([-0.5], dtype=torch.float64))
