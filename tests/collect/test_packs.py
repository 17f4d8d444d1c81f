"""The one declared pack table: reducers, split, expand and merge all follow it."""

import numpy as np
import pytest
import torch

from normscope.collect import decode as H
from normscope.collect import packs as P
from normscope.collect import reducers as R


def _pack(x, axis=1, masked=False, kind=("symlog",)):
    hist = R.HistSpec(*kind)
    layout = R.act_layout(x, axis, hist)
    pack, fast = R.reduce_act(x, layout, hist, None, 65536, R.Scratch(), force_masked=masked)
    return pack, fast, layout


def test_table_declares_every_field_once_with_a_merge_rule():
    for table in (P.ACT_FIELDS, P.GRAD_FIELDS):
        names = [f.name for f in table]
        assert len(names) == len(set(names))
        assert {f.merge for f in table} <= {"sum", "min", "max", "chan"}
        assert {f.width for f in table} <= {"1", "C", "H"}
    layout = P.ActLayout(numel=60, channels=3, samples=5, axis=1, hist_bins=71)
    # sizes follow from the table: full = every field, fast = the fields it carries
    assert layout.size == 11 + 4 * 3 + 71 and layout.fast_size == 6 + 3 * 3 + 71
    sl = P.slices(layout, False)
    assert sl["n"] == slice(0, 1) and sl["cnt"] == slice(11, 14) and sl["hist"] == slice(23, 94)


@pytest.mark.parametrize("axis", [1, -1])
def test_fast_pack_expands_to_the_masked_pack(axis):
    """The CPU fast pack, expanded on device, equals the NaN-safe reducer's full pack field by field."""
    x = torch.randn(6, 4, 5) * 3 + 0.5
    x[0, 0, 0] = 0.0
    fast_pack, fast, layout = _pack(x, axis)
    full_pack, full_fast, layout2 = _pack(x, axis, masked=True)
    assert fast and not full_fast and layout == layout2
    expanded = P.expand(fast_pack, layout, True)
    assert expanded.numel() == layout.size
    a, b = P.split(expanded.numpy(), layout, False), P.split(full_pack.numpy(), layout, False)
    c = P.split(fast_pack.numpy(), layout, True)  # fields the fast pack omits, derived on the host
    for f in P.ACT_FIELDS:
        np.testing.assert_allclose(a[f.name], b[f.name], rtol=1e-5, atol=1e-4, err_msg=f.name)
        np.testing.assert_allclose(c[f.name], b[f.name], rtol=1e-5, atol=1e-4, err_msg=f.name)


def test_grad_fast_pack_expands_to_the_masked_pack():
    g = torch.randn(3, 7)
    fast_pack, fast = R.reduce_grad(g)
    full_pack, full_fast = R.reduce_grad(g, force_masked=True)
    layout = P.GradLayout(g.numel())
    assert fast and not full_fast
    np.testing.assert_allclose(P.expand(fast_pack, layout, True).numpy(), full_pack.numpy(), rtol=1e-6)


def test_merge_follows_the_table_rules():
    a, b = torch.randn(4, 3, 2) - 1, torch.randn(9, 3, 2) * 2 + 1
    raws = []
    for t in (a, b):
        pack, fast, layout = _pack(t)
        raws.append(P.split(pack.numpy(), layout, fast))
    m = P.combine(*raws)
    both = torch.cat([a, b])
    assert m["min"] == pytest.approx(float(both.min())) and m["max"] == pytest.approx(float(both.max()))
    assert m["n"] == both.numel() and m["samples"] == 13
    v = both.double().transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(m["m2"], ((v - v.mean(1, keepdim=True)) ** 2).sum(1).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="channel count"):
        P.combine(raws[0], P.split(_pack(torch.randn(2, 5, 2))[0].numpy(), _pack(torch.randn(2, 5, 2))[2], True))


def test_pending_entries_decode_in_order_from_one_host_vector():
    x, y = torch.randn(4, 3, 2), torch.randn(5, 2)
    entries = []
    for key, t, axis in ((("train", "a", 0, ""), x, 1), (("train", "b", 0, ""), y, -1)):
        pack, fast, layout = _pack(t, axis)
        entries.append(H.PendingEntry("act", key, layout, fast, pack, "Linear"))
    g, gf = R.reduce_grad(y)
    entries.append(H.PendingEntry("grad", ("train", "b", 0, ""), P.GradLayout(y.numel()), gf, g))
    host = torch.cat([e.pack for e in entries]).numpy()
    acc = H.StepAccumulator()
    assert acc.decode(entries, host) == host.size
    assert list(acc.acts) == [("train", "a", 0, ""), ("train", "b", 0, "")]
    assert acc.acts[("train", "b", 0, "")].raw["n"] == y.numel()
    assert acc.grads[("train", "b", 0, "")]["sumsq"] == pytest.approx(float((y.double() ** 2).sum()))
    full = torch.cat(H.expand_pending(entries)).numpy()
    assert full.size == sum(e.full_size for e in entries)
    acc2 = H.StepAccumulator()
    acc2.decode(entries, full, full=True)
    np.testing.assert_allclose(acc2.acts[("train", "a", 0, "")].raw["s1"], acc.acts[("train", "a", 0, "")].raw["s1"])
