"""Every recorded statistic equals a brute-force numpy computation (random shapes and dtypes)."""

import math

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normscope.collect import decode as H
from normscope.collect import reducers as R

SPECS = {
    "plain": (R.HistSpec("symlog"), None),
    "sigmoid": (R.HistSpec("linear", 0.0, 1.0), R.SatSpec("sigmoid")),
    "tanh": (R.HistSpec("linear", -1.0, 1.0), R.SatSpec("tanh")),
    "hardtanh": (R.HistSpec("linear", -1.0, 1.0), R.SatSpec("bounds", -1.0, 1.0)),
    "relu6": (R.HistSpec("linear", 0.0, 6.0), R.SatSpec("bounds", 0.0, 6.0)),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run_reducer(x, axis, kind, hist_max=65536, masked=False, fused=True):
    """fused: the fused CPU kernel when it is loaded (tests/conftest.py loads it), else the torch ops."""
    hist, sat = SPECS[kind]
    layout = R.act_layout(x, axis, hist)
    pack, fast = R.reduce_act(x, layout, hist, sat, hist_max, R.Scratch(), force_masked=masked, fused=fused)
    assert pack.dtype == torch.float64 and pack.numel() == layout.pack_size(fast)
    assert fast == (not masked and bool(torch.isfinite(x).all()))
    return H.finish_act(H.split_act(pack.numpy(), layout, fast))


def assert_matches(got, want, scale):
    tol = 1e-5 * scale + 1e-30
    assert got["count"] == want["count"]
    assert got["samples"] == want["samples"]
    for k in ("nan_count", "inf_count", "hist_count"):
        assert got[k] == want[k], k
    for k in ("mean", "min", "max", "mean_abs"):
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=tol), k
    if not math.isnan(want["std"]):
        assert got["std"] == pytest.approx(want["std"], rel=1e-4, abs=1e-3 * scale + 1e-30)
    for k in ("frac_zero", "frac_nonpos", "frac_sat"):
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], abs=1e-12), k
    np.testing.assert_allclose(got["ch_mean"], want["ch_mean"], rtol=1e-4, atol=tol + 1e-6 * scale)
    np.testing.assert_allclose(got["ch_var"], want["ch_var"], rtol=1e-3, atol=1e-5 * scale * scale + 1e-30)
    np.testing.assert_array_equal(got["active"], want["active"])
    diff = np.abs(got["hist"] - want["hist"]).sum()
    assert diff <= 2 * want["_hist_slack"], (got["hist"], want["hist"])


@st.composite
def tensors(draw):
    nd = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd)))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-4, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.5, -3.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    if draw(st.booleans()):
        x = torch.relu(x)  # exercises the non-negative fast path and exact zeros
    if draw(st.booleans()):
        x = torch.where(torch.rand(shape, generator=g) < 0.2, torch.zeros_like(x), x)
    return x.to(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=tensors(),
    axis=st.sampled_from([1, -1]),
    kind=st.sampled_from(sorted(SPECS)),
    masked=st.booleans(),
    fused=st.booleans(),
)
def test_act_stats_match_numpy(x, axis, kind, masked, fused):
    if x.dim() < 2:
        axis = -1
    got = run_reducer(x, axis, kind, masked=masked, fused=fused)
    want = ref.act_stats(x.float().numpy(), axis, *SPECS[kind], 65536)
    scale = float(x.float().abs().max()) or 1.0
    assert_matches(got, want, scale)


@settings(max_examples=60, deadline=None)
@given(
    x=tensors(),
    frac=st.sampled_from([0.01, 0.3]),
    kind=st.sampled_from(["plain", "tanh"]),
    seed=st.integers(0, 999),
    fused=st.booleans(),
)
def test_non_finite_counted_and_excluded(x, frac, kind, seed, fused):
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    r = torch.rand(x.shape, generator=g)
    x = torch.where(r < frac / 2, torch.full_like(x, math.nan), x)
    x = torch.where(
        (r >= frac / 2) & (r < frac), torch.full_like(x, math.inf) * torch.sign(torch.randn(x.shape, generator=g)), x
    )
    axis = 1 if x.dim() >= 2 else -1
    got = run_reducer(x, axis, kind, fused=fused)  # CPU: the kernel or aminmax sees NaN/Inf: the masked path
    want = ref.act_stats(x.numpy(), axis, *SPECS[kind], 65536)
    assert_matches(got, want, float(torch.nan_to_num(x, 0, 0, 0).abs().max()) or 1.0)


@pytest.mark.parametrize("fused", [True, False])
def test_histogram_subsample_is_strided_with_prime_stride(fused):
    x = torch.randn(8, 16, 40, 40)  # 204800 elements, hist_max 4096 -> stride 53 (prime >= 50)
    got = run_reducer(x, 1, "plain", hist_max=4096, fused=fused)
    assert R.hist_stride(x.numel(), 4096) == 53
    want = ref.act_stats(x.numpy(), 1, *SPECS["plain"], 4096)
    assert got["hist_count"] == want["hist_count"] == len(range(0, x.numel(), 53))
    assert_matches(got, want, float(x.abs().max()))


@pytest.mark.parametrize("fused", [True, False])
def test_large_tensor_counts_exact_beyond_float32_integers(fused):
    x = torch.zeros(1, 1, 2**24 + 3)
    x[0, 0, :5] = 1.0  # 2**24 - 2 zeros: a float32 count would round
    got = run_reducer(x, 1, "plain", fused=fused)
    assert got["frac_zero"] * x.numel() == pytest.approx(2**24 - 2, abs=0.5)
    assert got["frac_nonpos"] * x.numel() == pytest.approx(2**24 - 2, abs=0.5)


@pytest.mark.parametrize("fused", [True, False])
def test_known_values_small(fused):
    x = torch.tensor([[0.0, -1.0, 2.0], [0.5, 0.0, -0.25]])  # (2 samples, 3 channels) channel-last
    got = run_reducer(x, -1, "plain", fused=fused)
    assert got["frac_zero"] == pytest.approx(2 / 6)
    assert got["frac_nonpos"] == pytest.approx(4 / 6)
    assert got["mean_abs"] == pytest.approx(3.75 / 6)
    np.testing.assert_array_equal(got["active"], [1, 0, 1])
    np.testing.assert_allclose(got["ch_mean"], [0.25, -0.5, 0.875])
    np.testing.assert_allclose(got["ch_var"], [0.0625, 0.25, 1.265625])
    assert got["hist"][35] == 2  # the two exact zeros in the central bin
    assert got["hist"][36 + 20 - 1] == 1  # 0.5 = 2**-1 opens the octave [0.5, 1)
    assert got["hist"][35 - 21] == 1  # -1.0 closes the negative octave (-2, -1]
    assert got["hist"].sum() == 6


@pytest.mark.parametrize("fused", [True, False])
def test_saturation_counts_sigmoid_tanh(fused):
    y = torch.tensor([0.005, 0.01, 0.5, 0.99, 0.995])
    assert run_reducer(y, -1, "sigmoid", fused=fused)["frac_sat"] == pytest.approx(2 / 5)
    t = torch.tensor([-0.99, -0.97, 0.0, 0.97, 0.98])
    assert run_reducer(t, -1, "tanh", fused=fused)["frac_sat"] == pytest.approx(2 / 5)
    h = torch.tensor([-1.0, -0.5, 0.0, 1.0])
    assert run_reducer(h, -1, "hardtanh", fused=fused)["frac_sat"] == pytest.approx(2 / 4)
    r = torch.tensor([0.0, 3.0, 6.0, 7.0, -1.0])  # relu6 bounds: at or past 0 and 6
    assert run_reducer(r, -1, "relu6", fused=fused)["frac_sat"] == pytest.approx(4 / 5)


@settings(max_examples=80, deadline=None)
@given(x=tensors(), masked=st.booleans(), poison=st.sampled_from([None, math.nan, math.inf]), fused=st.booleans())
def test_grad_stats_match_numpy(x, masked, poison, fused):
    x = x.float()
    if poison is not None:
        x.view(-1)[0] = poison
    p, fast = R.reduce_grad(x, force_masked=masked, fused=fused)
    assert fast == (not masked and poison is None)
    got = H.finish_grad(H.split_grad(p.numpy(), R.GradLayout(x.numel()), fast))
    want = ref.grad_stats(x.numpy())
    for k in ("count", "nan_count", "inf_count"):
        assert got[k] == want[k]
    for k in ("norm", "rms", "max_abs"):
        if math.isnan(want[k]):
            assert math.isnan(got[k])
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-30)


def test_combine_micro_batches_equals_one_batch():
    a, b = torch.randn(5, 3, 4) * 2 + 1, torch.randn(7, 3, 4) - 2
    hist, sat = SPECS["plain"]
    raws = []
    for t in (a, b):
        lay = R.act_layout(t, 1, hist)
        pack, fast = R.reduce_act(t, lay, hist, sat, 65536, R.Scratch())
        raws.append(H.split_act(pack.numpy(), lay, fast))
    got = H.finish_act(H.combine_act(*raws))
    want = ref.act_stats(torch.cat([a, b]).numpy(), 1, hist, sat, 10**9)
    assert_matches(got, want, 10.0)


def test_as_f32_is_contiguous_float32_for_every_layout():
    """Regression: a same-dtype .to(memory_format=...) returned a non-contiguous float32 tensor as is."""
    from normscope.collect.views import as_f32

    for x in (
        torch.randn(4, 6).t(),
        torch.randn(4, 6).half().t(),
        torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
    ):
        y = as_f32(x)
        assert y.dtype == torch.float32 and y.is_contiguous() and torch.equal(y, x.float())
