"""stats= presets: each preset's rows equal the brute-force reference for what it records, and
what it leaves out is stored as NaN / empty (never a made-up number)."""

import math

import models
import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reducers import SPECS, assert_matches, tensors

from normscope import NormscopeError, inspect, load, watch
from normscope.collect import decode as H
from normscope.collect import packs as P
from normscope.collect import reducers as R

MINIMAL_ABSENT = {"abs_sum", "n_zero", "n_nonpos", "n_sat", "hist_n", "active", "hist"}


def reduce(x, axis, kind, stats, masked=False, hist_max=65536, fused=True):
    hist, sat = SPECS[kind]
    layout = R.act_layout(x, axis, hist, stats=stats)
    pack, fast = R.reduce_act(x, layout, hist, sat, hist_max, R.Scratch(), force_masked=masked, fused=fused)
    assert pack.dtype == torch.float64 and pack.numel() == layout.pack_size(fast)
    raw = H.split_act(pack.numpy(), layout, fast)
    return layout, raw, H.finish_act(raw, layout.per_channel)


def test_pack_table_describes_each_preset():
    names = {s: {f.name for f in P.preset_fields(s)} for s in P.PRESETS}
    assert names["standard"] == names["full"] == {f.name for f in P.ACT_FIELDS}
    assert names["minimal"] == {f.name for f in P.ACT_FIELDS} - MINIMAL_ABSENT
    x = torch.randn(4, 3, 5)
    lay = R.act_layout(x, 1, R.HistSpec("symlog"), stats="minimal")
    assert lay.channels == 1 and not lay.per_channel and not lay.has("hist")
    assert lay.pack_size(True) == 4  # min, max, s1, m2: nothing else computed
    with pytest.raises(ValueError):
        P.preset_fields("everything")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=tensors(),
    axis=st.sampled_from([1, -1]),
    kind=st.sampled_from(sorted(SPECS)),
    masked=st.booleans(),
    fused=st.booleans(),
)
def test_minimal_rows_match_numpy(x, axis, kind, masked, fused):
    if x.dim() < 2:
        axis = -1
    layout, raw, got = reduce(x, axis, kind, "minimal", masked, fused=fused)
    assert MINIMAL_ABSENT.isdisjoint(raw)
    want = ref.act_stats(x.float().numpy(), axis, *SPECS[kind], 65536)
    scale = float(x.float().abs().max()) or 1.0
    assert got["count"] == want["count"] and got["samples"] == want["samples"]
    assert got["nan_count"] == want["nan_count"] == 0 and got["inf_count"] == 0
    for k in ("mean", "min", "max"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5 * scale + 1e-30), k
    assert got["std"] == pytest.approx(want["std"], rel=1e-4, abs=1e-3 * scale + 1e-30)
    for k in ("mean_abs", "frac_zero", "frac_nonpos", "frac_sat"):
        assert math.isnan(got[k]), k
    for k in ("ch_mean", "ch_var", "active", "hist"):
        assert len(got[k]) == 0, k
    assert got["hist_count"] == 0


@settings(max_examples=40, deadline=None)
@given(x=tensors(), frac=st.sampled_from([0.05, 0.3]), seed=st.integers(0, 999))
def test_minimal_non_finite_counted_and_excluded(x, frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    r = torch.rand(x.shape, generator=g)
    x = torch.where(r < frac / 2, torch.full_like(x, math.nan), x)
    x = torch.where((r >= frac / 2) & (r < frac), torch.full_like(x, -math.inf), x)
    _, _, got = reduce(x, -1, "plain", "minimal")  # aminmax sees NaN/Inf: the masked path
    want = ref.act_stats(x.numpy(), -1, *SPECS["plain"], 65536)
    assert (got["nan_count"], got["inf_count"], got["count"]) == (want["nan_count"], want["inf_count"], want["count"])
    for k in ("mean", "min", "max", "std"):
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-4 * (float(np.nanmax(np.abs(
                np.where(np.isfinite(x.numpy()), x.numpy(), 0)))) + 1e-30)), k  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=tensors(),
    kind=st.sampled_from(sorted(SPECS)),
    stats=st.sampled_from(["standard", "full"]),
    fused=st.booleans(),
)
def test_standard_and_full_rows_match_numpy(x, kind, stats, fused):
    axis = 1 if x.dim() >= 2 else -1
    _, _, got = reduce(x, axis, kind, stats, fused=fused)
    want = ref.act_stats(x.float().numpy(), axis, *SPECS[kind], 65536)
    assert_matches(got, want, float(x.float().abs().max()) or 1.0)


def test_minimal_micro_batches_merge_like_one_batch():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, 5, generator=g) * 3 + 1, torch.randn(2, 4, 5, generator=g) - 2
    ra, rb = (reduce(t, 1, "plain", "minimal")[1] for t in (a, b))
    got = H.finish_act(H.combine_act(ra, rb), per_channel=False)
    want = ref.act_stats(torch.cat([a, b]).numpy(), 1, *SPECS["plain"], 65536)
    assert got["count"] == want["count"] and got["samples"] == want["samples"]
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-5, abs=1e-6)
    assert got["std"] == pytest.approx(want["std"], rel=1e-5)
    assert math.isnan(got["frac_zero"]) and len(got["hist"]) == 0


@pytest.mark.parametrize("stats", ["minimal", "standard", "full"])
def test_preset_rows_end_to_end(tmp_path, stats):
    model = models.TinyResNet()
    captured = {}

    def cap(mod, args, out):
        captured.setdefault("fc", out.detach().clone())

    model.get_submodule("fc").register_forward_hook(cap)
    with watch(model, tmp_path / "r", every=1, stats=stats):
        models.train(model, 2)
    run = load(tmp_path / "r")
    assert run.meta["options"]["stats"] == stats
    row = run.stats[(run.stats.layer == "fc") & (run.stats.step == 0) & (run.stats.output == "")].iloc[0]
    t = captured["fc"].numpy()
    want = ref.act_stats(t, -1, R.HistSpec("symlog"), None, 0)
    assert row["count"] == t.size
    assert row["mean"] == pytest.approx(want["mean"], rel=1e-4, abs=1e-6)
    assert row["std"] == pytest.approx(want["std"], rel=1e-4)
    assert row["max"] == pytest.approx(want["max"]) and row["min"] == pytest.approx(want["min"])
    conv = run.stats[run.stats.layer == "stem.0"].iloc[0]
    if stats == "minimal":
        assert math.isnan(row["frac_zero"]) and math.isnan(row["mean_abs"])
        assert len(row["hist"]) == 0 and len(conv["ch_mean"]) == 0 and len(conv["active"]) == 0
    else:
        assert row["frac_zero"] == pytest.approx(want["frac_zero"])
        np.testing.assert_allclose(row["ch_mean"], want["ch_mean"], rtol=1e-4, atol=1e-6)
        assert len(conv["ch_mean"]) > 1 and len(row["hist"]) > 0
    if stats == "full":  # the histogram over every element, not a subsample
        assert (run.stats.hist_count == run.stats["count"]).all()
        assert run.meta["options"]["hist_max"] == 0
    assert len(run.grads) and len(run.params)  # gradient and parameter statistics in every preset


def test_minimal_run_inspects(tmp_path):
    model = models.TinyResNet()
    with watch(model, tmp_path / "r", every=1, stats="minimal"):
        models.train(model, 3)
    res = inspect(tmp_path / "r", report=False)  # the checks read NaN / empty where nothing was recorded
    assert {"non-finite", "vanishing-gradients", "small-batch-bn"} <= set(res.analysis.checks_run)
    skipped = {s.check: s.reason for s in res.analysis.skipped}
    for cid in ("dead-units", "saturation"):  # their data is not recorded: skipped with the reason
        assert "stats='minimal'" in skipped[cid], cid


def test_bad_preset_is_a_one_line_error():
    with pytest.raises(NormscopeError, match="stats must be one of"):
        watch(models.TinyResNet(), stats="everything")


@pytest.mark.parametrize("stats", ["minimal", "standard"])
def test_cross_rank_buffers_follow_the_preset(stats):
    """The SUM / MAX buffers of the distributed path are built from the layout's own fields."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 3, 6, generator=g) + 0.5, torch.randn(4, 3, 6, generator=g) * 2
    hist = R.HistSpec("symlog")
    lay = R.act_layout(a, 1, hist, stats=stats)
    packs = [R.reduce_act(t, lay, hist, None, 65536, R.Scratch()) for t in (a, b)]
    full = [P.expand(pack, lay, fast) for pack, fast in packs]
    stacked = torch.stack(full)
    assert stacked.shape[1] == lay.size
    sums, exts = P.sum_part(stacked, lay), P.ext_part(stacked, lay)
    assert sums.numel() == P.sum_width(lay) and exts.numel() == P.ext_width(lay)
    r = P.from_reduced(sums.numpy(), exts.numpy(), lay)
    assert set(r) == {f.name for f in lay.fields}
    got = H.finish_act(r, lay.per_channel)
    want = ref.act_stats(torch.cat([a, b]).numpy(), 1, hist, None, 65536)
    assert got["count"] == want["count"] and got["samples"] == want["samples"]
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-5, abs=1e-6)
    assert got["std"] == pytest.approx(want["std"], rel=1e-5)
    assert got["min"] == pytest.approx(want["min"]) and got["max"] == pytest.approx(want["max"])
    if stats == "minimal":
        assert P.sum_width(lay) < P.sum_width(R.act_layout(a, 1, hist))
        assert math.isnan(got["frac_nonpos"]) and len(got["hist"]) == 0
    else:
        assert got["frac_nonpos"] == pytest.approx(want["frac_nonpos"])
        np.testing.assert_allclose(got["ch_var"], want["ch_var"], rtol=1e-4)
