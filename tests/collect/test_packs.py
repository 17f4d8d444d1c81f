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


def _rows_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        w = b[k]
        if isinstance(v, np.ndarray):
            assert v.dtype == np.asarray(w).dtype, k
            np.testing.assert_array_equal(v, w, err_msg=k)
        elif isinstance(v, float) and np.isnan(v):
            assert np.isnan(w), k
        elif isinstance(v, str):
            assert v == w, k
        else:
            assert type(v) is type(w) and v == pytest.approx(w, rel=1e-12, abs=1e-300), k


@pytest.mark.parametrize("stats", ["minimal", "standard", "full"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_column_wise_decode_equals_row_by_row(stats, masked, per_channel):
    """The step's column-wise decode (one numpy pass per layout) writes what finish_act /
    finish_grad give pack by pack, in the same row order, NaN/Inf and empty tensors included."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 5), (4, 3, 5), (2, 6), (4, 3, 5), (3, 2, 2, 2)]
    xs = [torch.randn(s, generator=g) * 2 - 0.5 for s in shapes]
    xs[1] = torch.relu(xs[1])
    xs[3].view(-1)[:4] = torch.tensor([float("nan"), float("inf"), 0.0, -float("inf")])
    hist = R.HistSpec("symlog")
    pending = []
    for i, x in enumerate(xs):
        layout = R.act_layout(x, 1, hist, None if per_channel else 1, stats)
        pack, fast = R.reduce_act(x, layout, hist, R.SatSpec("tanh"), 65536, R.Scratch(), force_masked=masked)
        pending.append(H.PendingEntry("act", ("train", f"l{i}", 0, ""), layout, fast, pack, "Linear"))
        gp, gfast = R.reduce_grad(x, force_masked=masked)
        pending.append(H.PendingEntry("grad", ("train", f"l{i}", 0, ""), R.GradLayout(x.numel()), gfast, gp))
    host = torch.cat([e.pack for e in pending]).numpy()

    class W:
        def __init__(self):
            self.rows = {"stats": [], "grads": []}

        def append(self, table, row):
            self.rows[table].append(row)

        def extend(self, table, cols):
            n = len(next(iter(cols.values())))
            self.rows[table] += [{c: v[j] for c, v in cols.items()} for j in range(n)]

    by_cols, by_rows = W(), W()
    acc = H.StepAccumulator()
    assert acc.decode(pending, host, columns=True) == host.size
    assert acc._columns is not None  # every key once: the column-wise path
    acc.write(by_cols, 7)
    acc = H.StepAccumulator()
    acc.decode(pending + pending[:1], np.concatenate([host, host[: pending[0].layout.pack_size(pending[0].fast)]]),
               columns=True)  # fmt: skip
    assert acc._columns is None  # a key seen twice: merged pack by pack
    acc = H.StepAccumulator()
    off = 0
    for e in pending:  # the reference: pack by pack
        size = e.layout.pack_size(e.fast)
        raw = P.split(host[off : off + size], e.layout, e.fast)
        off += size
        if e.kind == "act":
            acc.add_act(e.key, raw, e.module_type, e.layout.axis, e.layout.per_channel)
        else:
            acc.add_grad(e.key, raw)
    acc.write(by_rows, 7)
    for table in ("stats", "grads"):
        assert len(by_cols.rows[table]) == len(by_rows.rows[table]) == len(xs)
        for a, b in zip(by_cols.rows[table], by_rows.rows[table]):
            _rows_equal(dict(a), dict(b))
