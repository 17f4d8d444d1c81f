"""The fused CPU kernel (normscope/collect/fused.cpp): the same packs as the torch ops, on every
layout the kernel treats apart (channel-last rows, short runs, long runs, runs past one float32
block, threads), the NaN-safe fallback, and a loader that never breaks a run."""

import copy
import math
import os
import zlib

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reducers import SPECS, assert_matches

import normscope
from normscope.collect import decode as H
from normscope.collect import native
from normscope.collect import reducers as R
from normscope.collect import updates as U
from normscope.store import load

needs_kernel = pytest.mark.skipif(
    native.mode() == "off" or not native.library_path().exists(), reason="the fused kernel is not built here"
)


def test_kernel_is_loaded_when_required():
    if os.environ.get("NORMSCOPE_REQUIRE_KERNEL") == "1":
        assert native.KERNEL is not None and native.STATE == "fused", native.STATE
    elif native.KERNEL is None:
        pytest.skip(f"fused kernel: {native.STATE}")


def rows(x, axis, kind, stats="standard", hist_max=4096, fused=True, max_channels=None):
    if fused:  # a kernel that failed to load would make fused=True the torch path: a comparison of it with itself
        assert native.KERNEL is not None, native.STATE
    hist, sat = SPECS[kind]
    lay = R.act_layout(x, axis, hist, max_channels, stats)
    pack, fast = R.reduce_act(x, lay, hist, sat, hist_max, R.Scratch(), fused=fused)
    return fast, H.finish_act(H.split_act(pack.numpy(), lay, fast), lay.per_channel)


EXACT = ("count", "samples", "frac_zero", "frac_nonpos", "frac_sat", "nan_count", "inf_count", "hist_count", "min",
         "max")  # fmt: skip

# (shape, axis): the kernel's rows mode (S == 1; runs of 2, 4, 8 reduced inside a vector, with and
# without a row tail; runs of whole vectors, 16 and 48; other short runs), its runs mode (S >= 64, and
# rows too long for the rows buffer), a run longer than one float32 block (4096), channel counts
# off the vector width, one-element tensors
SHAPES = [((37, 129), -1), ((3, 5, 2, 3), 1), ((4, 33, 7), 1), ((2, 19, 16), 1), ((3, 6, 40, 41), 1),
          ((2, 3, 9000), 1), ((1, 1, 12289), 1), ((1,), -1), ((6, 17, 5), -1), ((2, 300, 2, 2), 1),
          ((3, 5, 2, 2), 1), ((4, 3, 8), 1), ((5, 8, 2), 1), ((3, 7, 48), 1), ((2, 1100, 63), 1),
          ((2, 9, 64), 1)]  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("stats", ["minimal", "standard", "full"])
def test_fused_rows_equal_torch_rows_and_numpy(shape, axis, kind, stats):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind, stats)).encode()))  # not hash(): salted
    x = torch.randn(shape, generator=g) * 2 + 0.3
    if kind in ("sigmoid",):
        x = torch.sigmoid(x * 3)
    elif kind in ("tanh", "hardtanh"):
        x = torch.tanh(x * 2).clamp(-1, 1)
    elif kind == "relu6":
        x = torch.nn.functional.relu6(x * 3)
    x = torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros_like(x), x)  # exact zeros
    hm = 0 if stats == "full" else 4096
    fa, a = rows(x, axis, kind, stats, hm, fused=True)
    fb, b = rows(x, axis, kind, stats, hm, fused=False)
    assert fa and fb
    for k in a:
        va, vb = np.asarray(a[k], float), np.asarray(b[k], float)
        if k in EXACT or k in ("hist", "active"):
            np.testing.assert_array_equal(va, vb, err_msg=k)
        else:  # the torch path sums in float32 (std off by up to ~3e-5 on 1e5 elements); the kernel is checked below
            np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-6, err_msg=k)
    x64 = x.double().numpy()
    assert a["mean"] == pytest.approx(x64.mean(), rel=1e-6, abs=1e-7)
    assert a["std"] == pytest.approx(x64.std(), rel=1e-5, abs=1e-7)  # float64 truth: the kernel to 1e-5
    if stats != "minimal":
        want = ref.act_stats(x.numpy(), axis, *SPECS[kind], hm)
        assert_matches(a, want, float(x.abs().max()) or 1.0)


@needs_kernel
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=st.integers(1, 9), c=st.integers(1, 40), s=st.sampled_from([1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 48, 63, 64, 100]),
    kind=st.sampled_from(sorted(SPECS)), seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 4.0, -2.0]),
)  # fmt: skip
def test_fused_matches_numpy_on_random_layouts(a, c, s, kind, seed, offset):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(a, c, s, generator=g) + offset
    if seed % 2:
        x = x.relu()
    fast, got = rows(x, 1, kind, hist_max=65536)
    assert fast
    assert_matches(got, ref.act_stats(x.numpy(), 1, *SPECS[kind], 65536), float(x.abs().max()) or 1.0)


@needs_kernel
def test_threads_split_the_rows_and_give_the_same_statistics():
    x = torch.randn(64, 24, 33, 11) * 3  # 557568 elements: more than one chunk per thread
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = rows(x, 1, "plain")
        torch.set_num_threads(2)
        _, two = rows(x, 1, "plain")
        g1 = R.reduce_grad(x.view(-1))[0]
        torch.set_num_threads(1)
        g2 = R.reduce_grad(x.view(-1))[0]
    finally:
        torch.set_num_threads(before)
    for k in one:
        va, vb = np.asarray(one[k], float), np.asarray(two[k], float)
        if k in EXACT or k in ("hist", "active"):
            np.testing.assert_array_equal(va, vb, err_msg=k)
        else:
            np.testing.assert_allclose(va, vb, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-6)
    want = ref.grad_stats(x.view(-1).numpy())
    assert math.sqrt(g1[0]) == pytest.approx(want["norm"], rel=1e-5)


@needs_kernel
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors_take_the_nan_safe_path(poison):
    x = torch.randn(4, 20, 30)
    x[2, 7, 29] = poison  # the last element of a run: the kernel's tail lanes must see it
    assert native.KERNEL.act_pack(x, 4, 20, 30, True, 1, 71, 0.0, 0.0, 1, 0, 0.0, 0.0, -20, 34).numel() == 0
    assert native.KERNEL.grad_pack(x.view(-1)).numel() == 0
    fast, got = rows(x, 1, "plain", hist_max=65536)
    assert not fast
    assert_matches(got, ref.act_stats(x.numpy(), 1, *SPECS["plain"], 65536), float(x.nan_to_num(0, 0, 0).abs().max()))


def test_kernel_off_never_builds_or_loads(monkeypatch):
    monkeypatch.setenv("NORMSCOPE_KERNEL", "off")
    monkeypatch.setattr(native, "STATE", native.STATE)
    monkeypatch.setattr(native, "KERNEL", object())
    monkeypatch.setattr(native, "_spawn_build", lambda: pytest.fail("no build with NORMSCOPE_KERNEL=off"))
    assert native.load() is None and native.KERNEL is None and native.STATE.startswith("off")


def test_a_missing_build_starts_one_background_build_and_the_run_goes_on(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "STATE", native.STATE)
    monkeypatch.setattr(native, "KERNEL", None)
    monkeypatch.setattr(native, "_BUILD", None)
    spawned = []

    class Running:
        def poll(self):
            return None

    def spawn():
        spawned.append(1)
        return Running()

    monkeypatch.setattr(native, "_spawn_build", spawn)
    assert native.load(background_build=False) is None and not spawned
    assert native.STATE == "not built; run `normscope build-kernel`"
    assert native.load() is None and native.load() is None
    assert spawned == [1] and "background" in native.STATE
    x = torch.randn(3, 4, 5)
    lay = R.act_layout(x, 1, SPECS["plain"][0])
    pack, fast = R.reduce_act(x, lay, *SPECS["plain"], 4096, R.Scratch())  # the torch path
    assert fast and pack.numel() == lay.fast_size


def test_a_broken_build_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "STATE", native.STATE)
    monkeypatch.setattr(native, "KERNEL", None)
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    assert native.load() is None
    assert native.STATE.startswith("unavailable") and "normscope build-kernel" in native.STATE


@needs_kernel
def test_runs_with_and_without_the_kernel_record_the_same_rows(tmp_path, monkeypatch):
    import models

    base = models.TinyResNet()

    def run(path):
        m = copy.deepcopy(base)
        with normscope.watch(m, path, every=1):
            models.train(m, 3)
        return load(path)

    fused = run(tmp_path / "fused")
    monkeypatch.setattr(native, "KERNEL", None)
    monkeypatch.setattr(native, "load", lambda background_build=True: None)
    plain = run(tmp_path / "torch")
    assert fused.meta["kernel"] == "fused"
    keys = ["step", "phase", "layer", "call", "output"]
    a, b = (r.stats.sort_values(keys).reset_index(drop=True) for r in (fused, plain))
    assert len(a) == len(b) > 0 and a[keys].equals(b[keys])
    for col in ("count", "frac_zero", "frac_nonpos", "frac_sat", "min", "max"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    for col in ("mean", "std", "mean_abs"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-5, atol=1e-7, err_msg=col)
    for col in ("hist", "active"):  # per-row lists: the histogram and per-channel activity, exactly
        assert all(np.array_equal(u, v) for u, v in zip(a[col], b[col], strict=True)), col
    ga, gb = (r.grads.sort_values(keys).reset_index(drop=True) for r in (fused, plain))
    assert len(ga) == len(gb) > 0
    np.testing.assert_allclose(ga["norm"].to_numpy(), gb["norm"].to_numpy(), rtol=1e-5)
    pa, pb = (r.params.sort_values(["step", "param"]).reset_index(drop=True) for r in (fused, plain))
    assert len(pa) == len(pb) > 0 and (pa.update_norm > 0).all()  # every weight trains: the kernel's Δw path
    for col in ("norm", "grad_norm", "update_norm"):
        np.testing.assert_allclose(pa[col].to_numpy(), pb[col].to_numpy(), rtol=1e-5, err_msg=col)


def test_the_kernel_writes_each_presets_fast_pack_and_steps_aside_for_a_new_field(monkeypatch):
    from normscope.collect import packs as P

    for stats in P.PRESETS:
        assert R._kernel_writes(stats), stats  # the kernel's field list is the pack table's
    R._kernel_writes.cache_clear()
    extra = P.Field("n_extra", "1", "sum", True, "standard")
    monkeypatch.setattr(P, "ACT_FIELDS", P.ACT_FIELDS + (extra,))
    monkeypatch.setattr(R, "preset_fields", lambda stats: P.preset_fields.__wrapped__(stats, P.ACT_FIELDS))
    try:
        assert not R._kernel_writes("standard") and R._kernel_writes("minimal")
    finally:
        R._kernel_writes.cache_clear()


@needs_kernel
def test_parameter_norms_match_numpy_and_decline_other_kinds():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=g) * 3 for n in (0, 1, 15, 16, 17, 4097, 300001)]
    want = [float(np.sum(t.numpy().astype(np.float64) ** 2)) for t in ts]
    np.testing.assert_allclose(native.KERNEL.sq_norms(ts).numpy(), want, rtol=1e-6)
    us = [t + torch.randn(t.shape, generator=g) * 1e-3 for t in ts]
    want = [float(np.sum((t.numpy().astype(np.float64) - u.numpy()) ** 2)) for t, u in zip(ts, us)]
    diff = U.step_sq_norms(ts, None, [(2, u, None, 0.0, 0.0, 1.0, 0.0, 0.0) for u in us])
    np.testing.assert_allclose(diff[2].numpy(), want, rtol=1e-4)
    # anything but contiguous float32 CPU tensors of equal sizes: declined (the caller uses foreach ops)
    assert native.KERNEL.sq_norms([ts[3], torch.randn(4, 6).t()]).numel() == 0
    assert native.KERNEL.sq_norms([ts[3], torch.randn(8).half()]).numel() == 0
    assert U.step_sq_norms([ts[3]], None, [(2, ts[4], None, 0.0, 0.0, 1.0, 0.0, 0.0)]) is None


@needs_kernel
def test_tracked_parameter_norms_equal_with_and_without_the_kernel(monkeypatch):
    from normscope.collect.params import ParamTracker

    def tracked(kernel):
        monkeypatch.setattr(native, "KERNEL", kernel)
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))
        m[2].bias.requires_grad_(False)  # frozen: its update norm is 0, its gradient missing
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        tr = ParamTracker(m)
        for _ in range(2):
            opt.zero_grad()
            m(torch.randn(16, 40)).square().mean().backward()
            tr.before_step()
            opt.step()
            tr.after_step(True)
        return tr.take().view(3, -1).numpy()

    kernel = native.KERNEL
    assert kernel is not None, native.STATE
    got, want = tracked(kernel), tracked(None)
    np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)
    assert np.isnan(got[1, -1]) and got[2, -1] == 0.0  # the frozen bias


@needs_kernel
def test_arguments_that_would_read_or_write_out_of_bounds_raise_not_crash():
    """Regression: a symlog bin count other than the exponent range's wrote past the histogram
    (a segfault, found by hand-calling the kernel); the reducers never pass one, the kernel now
    refuses it, like a wrong (A, C, S)."""
    x = torch.randn(4, 20, 30)
    k = native.KERNEL
    args = (0.0, 0.0, 1, 0, 0.0, 0.0, -20, 34)
    assert k.act_pack(x, 4, 20, 30, True, 1, 71, *args).numel() > 0
    for a, c, s, bins in [(4, 20, 30, 32), (4, 20, 31, 71), (4, 20, 30, -1)]:
        with pytest.raises(RuntimeError, match="act_pack"):
            k.act_pack(x, a, c, s, True, 1, bins, *args)


@needs_kernel
def test_tensors_without_storage_are_declined_not_read():
    """Regression: under torch.func.grad the tracker's norms reached wrapper tensors (no storage):
    'Cannot access data pointer of Tensor that doesn't have storage' became a hook error."""
    seen = []

    def f(w):
        seen.append((native.KERNEL.sq_norms([w]).numel(), U.step_sq_norms([w], [w], [None])))
        return (w * w).sum()

    torch.func.grad(f)(torch.randn(5))
    assert seen == [(0, None)]
