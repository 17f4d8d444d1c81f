"""Host side of a sampled step: packs → merged raw fields per entry → rows for the run directory.

Splitting and merging follow the field tables of :mod:`normscope.collect.packs`; this module adds
the entry bookkeeping (:class:`PendingEntry`, :class:`StepAccumulator`) and the derived columns
that the run directory stores (:func:`finish_act`, :func:`finish_grad`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from normscope.collect import packs as P
from normscope.collect.packs import ActLayout, GradLayout


@dataclass(frozen=True)
class PendingEntry:
    """One reduced tensor of the current sampled step, waiting for the step's host transfer."""

    kind: str  # "act" | "grad"
    key: tuple  # (phase, layer, call, output path)
    layout: Any  # ActLayout | GradLayout
    fast: bool  # the pack is in the fast layout (host-side fields derived from the layout)
    pack: torch.Tensor
    module_type: str = ""

    @property
    def full_size(self) -> int:
        return self.layout.size


@dataclass
class _ActEntry:
    raw: dict
    module_type: str
    axis: int
    forwards: int = 1
    per_channel: bool = True


@dataclass
class StepAccumulator:
    """Merges packs of the same entry (micro-batches, eval batches, ranks) in arrival order."""

    acts: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    _columns: tuple | None = None  # (pending, decoded rows) of a step decoded column-wise

    def add_act(self, key: tuple, raw: dict, mtype: str, axis: int, per_channel: bool = True, forwards: int = 1):
        ent = self.acts.get(key)
        if ent is None:
            self.acts[key] = _ActEntry(raw, mtype, axis, forwards, per_channel)
        else:
            ent.raw = combine_act(ent.raw, raw)
            ent.forwards += forwards

    def add_merged(self, key: tuple, raw: dict, mtype: str, layout: ActLayout, forwards: int) -> None:
        """Raw fields already merged (across ranks and micro-batches) from ``forwards`` packs."""
        self.add_act(key, raw, mtype, layout.axis, layout.per_channel, forwards)

    def add_grad(self, key: tuple, raw: dict) -> None:
        self.grads[key] = combine_grad(self.grads[key], raw) if key in self.grads else raw

    def decode(self, pending: list[PendingEntry], host: np.ndarray, full: bool = False, columns: bool = False) -> int:
        """Split one host vector laid out like ``pending``; ``full``: every pack in the full layout.

        ``columns``: when every entry is new and seen once (no micro-batches to merge: the usual
        step), decode column-wise, one numpy pass per layout (:func:`finish_act_many`), and let
        :meth:`write` append whole columns (nothing lands in ``acts``/``grads``); else pack by
        pack, merged in arrival order."""
        if columns and not full and not self.acts and not self.grads and self._columns is None:
            keys = {(e.kind, e.key) for e in pending}
            if len(keys) == len(pending):
                return self._decode_columns(pending, host)
        off = 0
        for e in pending:
            fast = e.fast and not full
            size = e.layout.pack_size(fast)
            raw = P.split(host[off : off + size], e.layout, fast)
            if e.kind == "act":
                self.add_act(e.key, raw, e.module_type, e.layout.axis, e.layout.per_channel)
            else:
                self.add_grad(e.key, raw)
            off += size
        return off

    def _decode_columns(self, pending: list[PendingEntry], host: np.ndarray) -> int:
        tmpls = [_template(e.layout, e.fast) for e in pending]  # one cached lookup per pack
        offs = np.concatenate([[0], np.cumsum([t[0] for t in tmpls])]).astype(np.int64)
        cols = {}
        for kind, finish in (("act", finish_act_flat), ("grad", finish_grad_flat)):
            idx = [i for i, e in enumerate(pending) if e.kind == kind]
            if idx:
                cols[kind] = (idx, finish([pending[i] for i in idx], offs[idx], host, [tmpls[i] for i in idx]))
        self._columns = (pending, cols)
        return int(offs[-1])

    def _write_columns(self, writer, step: int, grad_scale: float | None = None) -> None:
        pending, cols = self._columns
        for kind, table in (("act", "stats"), ("grad", "grads")):
            if kind not in cols:
                continue
            idx, c = cols[kind]
            es = [pending[i] for i in idx]
            c = dict(c, step=[step] * len(es), phase=[e.key[0] for e in es], layer=[e.key[1] for e in es],
                     call=[e.key[2] for e in es], output=[e.key[3] for e in es])  # fmt: skip
            if kind == "act":
                c.update(module_type=[e.module_type for e in es], channel_axis=[e.layout.axis for e in es],
                         forwards=[1] * len(es))  # fmt: skip
            elif grad_scale is not None:
                c.update({k: (np.asarray(c[k], dtype=float) / grad_scale).tolist() for k in GRAD_SCALED})
            writer.extend(table, c)

    def write(self, writer, step: int, grad_scale: float | None = None) -> None:
        """Append the step's rows; ``grad_scale``: the loss scale the backward ran under (the
        output gradients' rows are divided by it)."""
        if self._columns is not None:
            self._write_columns(writer, step, grad_scale)
        for key, ent in self.acts.items():
            row = finish_act(ent.raw, ent.per_channel)
            phase, layer, call, path = key
            row.update(step=step, phase=phase, layer=layer, call=call, output=path, module_type=ent.module_type,
                       channel_axis=ent.axis, forwards=ent.forwards)  # fmt: skip
            writer.append("stats", row)
        for key, raw in self.grads.items():
            row = finish_grad(raw)
            if grad_scale is not None:
                row.update({k: row[k] / grad_scale for k in GRAD_SCALED})
            phase, layer, call, path = key
            row.update(step=step, phase=phase, layer=layer, call=call, output=path)
            writer.append("grads", row)


def expand_pending(pending: list[PendingEntry]) -> list[torch.Tensor]:
    """Every pack in the full layout (device ops): what one rank keeps when the ranks disagree."""
    return [P.expand(e.pack, e.layout, e.fast) for e in pending]


# --- raw fields of packs: split, merge, finish --------------------------------------------------


def split_act(pack: np.ndarray, layout: ActLayout, fast: bool = False) -> dict:
    """Raw (combinable) fields of one activation pack."""
    return P.split(pack, layout, fast)


def combine_act(a: dict, b: dict) -> dict:
    """Merge raw fields of two packs of the same layer call (e.g. two micro-batches)."""
    return P.combine(a, b, P.ACT_FIELDS)


def finish_act(r: dict, per_channel: bool = True) -> dict:
    """Derived statistics (what the run directory stores) from raw fields.

    ``per_channel=False`` (a tensor above ``max_channels``, reduced as one channel): the global
    statistics are exact, the per-channel lists (``ch_mean``, ``ch_var``, ``active``) are empty.
    Fields absent from ``r`` (not computed under the run's ``stats=`` preset) give NaN scalars
    and empty lists."""
    n = r["n"]
    cnt, s1, m2 = r["cnt"], r["s1"], r["m2"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ch_mean = np.where(cnt > 0, s1 / np.maximum(cnt, 1), np.nan)
        ch_var = np.where(cnt > 0, m2 / np.maximum(cnt, 1), np.nan)
    if n > 0:
        mean = s1.sum() / n
        m2_all = m2.sum() + (cnt * (np.nan_to_num(ch_mean) - mean) ** 2).sum()
        std = math.sqrt(max(m2_all / n, 0.0))
        mn, mx = float(r["min"]), float(r["max"])
    else:
        mean = std = mn = mx = math.nan
    frac = (lambda k: float(r[k] / n) if k in r else math.nan) if n > 0 else (lambda k: math.nan)
    has_active, has_hist = "active" in r, "hist" in r
    return {
        "count": int(n + r["n_nan"] + r["n_inf"]),
        "samples": int(r["samples"]),
        "mean": float(mean),
        "std": float(std),
        "min": mn,
        "max": mx,
        "mean_abs": frac("abs_sum"),
        "frac_zero": frac("n_zero"),
        "frac_nonpos": frac("n_nonpos"),
        "frac_sat": frac("n_sat"),
        "nan_count": int(r["n_nan"]),
        "inf_count": int(r["n_inf"]),
        "ch_mean": ch_mean.astype(np.float32) if per_channel else np.zeros(0, np.float32),
        "ch_var": ch_var.astype(np.float32) if per_channel else np.zeros(0, np.float32),
        "active": r["active"].astype(np.int64) if per_channel and has_active else np.zeros(0, np.int64),
        "hist": r["hist"].astype(np.int64) if has_hist else np.zeros(0, np.int64),
        "hist_count": int(r["hist_n"]) if has_hist else 0,
    }


def split_grad(pack: np.ndarray, layout: GradLayout, fast: bool = False) -> dict:
    return P.split(pack, layout, fast)


def combine_grad(a: dict, b: dict) -> dict:
    return P.combine(a, b, P.GRAD_FIELDS)


# the grads table's columns that scale with the loss (the counts do not)
GRAD_SCALED = ("norm", "rms", "max_abs")


def finish_grad(r: dict) -> dict:
    n = r["n"]
    return {
        "count": int(n + r["n_nan"] + r["n_inf"]),
        "norm": float(math.sqrt(r["sumsq"])),
        "rms": float(math.sqrt(r["sumsq"] / n)) if n > 0 else math.nan,
        "max_abs": float(r["max_abs"]) if n > 0 else math.nan,
        "nan_count": int(r["n_nan"]),
        "inf_count": int(r["n_inf"]),
    }


# --- column-wise: every pack of a step at once, each field gathered from all packs in one index ----


_SCALARS = {"act": [f.name for f in P.ACT_FIELDS if f.width == "1"], "grad": [f.name for f in P.GRAD_FIELDS]}
_VECTORS = [f.name for f in P.ACT_FIELDS if f.width != "1"]


@lru_cache(maxsize=4096)
def _template(layout, fast: bool) -> tuple:
    """(pack size, scalar positions, vector starts, vector widths) of a pack of ``layout``, over
    the table's scalar and vector fields (position -1: not in the pack, derived or not recorded;
    ``cnt`` keeps its width when derived)."""
    sl = P.slices(layout, fast)
    kind = "grad" if isinstance(layout, GradLayout) else "act"
    pos = tuple(sl[k].start if k in sl else -1 for k in _SCALARS[kind])
    if kind == "grad":
        return P.pack_size(layout, fast), pos, (), ()
    have = {f.name: layout.width(f) for f in layout.fields}
    starts = tuple(sl[k].start if k in sl else -1 for k in _VECTORS)
    widths = tuple(have[k] if k in sl or (k == "cnt" and k in have) else 0 for k in _VECTORS)
    return P.pack_size(layout, fast), pos, starts, widths


class _Packs:
    """The packs of one kind in a step's host vector, with every field's position in one array."""

    def __init__(self, entries, offs: np.ndarray, host: np.ndarray, tmpls: list):
        self.host, self.offs, self.m = host, offs, len(entries)
        self.kind = "act" if entries[0].kind == "act" else "grad"
        self.pos = np.array([t[1] for t in tmpls], dtype=np.int64).reshape(self.m, -1)
        if self.kind == "act":
            self.vstart = np.array([t[2] for t in tmpls], dtype=np.int64).reshape(self.m, -1)
            self.vwidth = np.array([t[3] for t in tmpls], dtype=np.int64).reshape(self.m, -1)

    def scalar(self, name: str, default) -> np.ndarray:
        """One scalar field of every pack (``default`` where a pack derives it or lacks it)."""
        pos = self.pos[:, _SCALARS[self.kind].index(name)]
        have = pos >= 0
        if np.ndim(default) == 0:
            out = np.full(self.m, default, dtype=np.float64)
        else:
            out = np.array(default, dtype=np.float64).reshape(self.m)  # (a copy)
        out[have] = self.host[self.offs[have] + pos[have]]
        return out

    def vector(self, name: str):
        """One vector field of every pack, concatenated: (values, widths, present); NaN where a
        pack does not carry it (``cnt`` of a fast pack: the caller fills it in)."""
        j = _VECTORS.index(name)
        starts, widths = self.vstart[:, j], self.vwidth[:, j]
        have = starts >= 0
        total = int(widths.sum())
        base = np.repeat(self.offs + starts - (np.cumsum(widths) - widths), widths) + np.arange(total)
        ok = np.repeat(have, widths)
        vals = np.full(total, np.nan)
        vals[ok] = self.host[base[ok]]
        return vals, widths, have


def _split(v: np.ndarray, widths: np.ndarray) -> list:
    ends = np.cumsum(widths).tolist()
    return [v[e - w : e] for e, w in zip(ends, widths.tolist())]


def finish_act_flat(entries: list[PendingEntry], offs: np.ndarray, host: np.ndarray, tmpls: list) -> dict:
    """:func:`finish_act` of every entry (packs at ``offs`` of ``host``), as columns: the same
    values, one numpy pass per field over all packs of the step instead of one per field per pack."""
    pk = _Packs(entries, offs, host, tmpls)
    fast = np.array([e.fast for e in entries])
    numel = np.array([e.layout.numel for e in entries], dtype=np.float64)
    chans = np.array([e.layout.channels for e in entries], dtype=np.int64)
    n = pk.scalar("n", numel)
    n_nan = pk.scalar("n_nan", 0.0)
    n_inf = pk.scalar("n_inf", 0.0)
    samples = pk.scalar("samples", [e.layout.samples for e in entries])
    s1, cw, _ = pk.vector("s1")
    m2, _, _ = pk.vector("m2")
    cnt, _, cnt_have = pk.vector("cnt")
    derived = np.repeat(fast | ~cnt_have, cw)  # fast packs: numel / C per channel
    cnt[derived] = np.repeat(numel / chans, cw)[derived]
    first = np.cumsum(cw) - cw
    with np.errstate(invalid="ignore", divide="ignore"):
        ch_mean = np.where(cnt > 0, s1 / np.maximum(cnt, 1), np.nan)
        ch_var = np.where(cnt > 0, m2 / np.maximum(cnt, 1), np.nan)
        seen = n > 0
        nn = np.where(seen, n, 1.0)
        mean = np.add.reduceat(s1, first) / nn
        dev = cnt * (np.nan_to_num(ch_mean) - np.repeat(mean, cw)) ** 2
        m2_all = np.add.reduceat(m2, first) + np.add.reduceat(dev, first)
        std = np.sqrt(np.maximum(m2_all / nn, 0.0))

    def unseen_nan(v):
        return np.where(seen, v, np.nan).tolist()

    def frac(name):
        return unseen_nan(pk.scalar(name, np.nan) / nn)

    hist, hw, hist_have = pk.vector("hist")
    hist[np.isnan(hist)] = 0.0  # (counts: NaN only where a pack lacks the field)
    sums = np.add.reduceat(hist, np.cumsum(hw) - hw) if hist.size and hw.all() else 0.0
    hist_n = np.where(hist_have & (hw > 0), pk.scalar("hist_n", sums), 0)
    active, aw, act_have = pk.vector("active")
    per = np.array([e.layout.per_channel for e in entries])
    ef, ei = np.zeros(0, np.float32), np.zeros(0, np.int64)
    chm, chv = _split(ch_mean.astype(np.float32), cw), _split(ch_var.astype(np.float32), cw)
    active[np.isnan(active)] = 0.0
    acts = _split(active.astype(np.int64), aw)
    hists = _split(hist.astype(np.int64), hw)
    return {
        "count": (n + n_nan + n_inf).astype(np.int64).tolist(),
        "samples": samples.astype(np.int64).tolist(),
        "mean": unseen_nan(mean),
        "std": unseen_nan(std),
        "min": unseen_nan(pk.scalar("min", np.nan)),
        "max": unseen_nan(pk.scalar("max", np.nan)),
        "mean_abs": frac("abs_sum"),
        "frac_zero": frac("n_zero"),
        "frac_nonpos": frac("n_nonpos"),
        "frac_sat": frac("n_sat"),
        "nan_count": n_nan.astype(np.int64).tolist(),
        "inf_count": n_inf.astype(np.int64).tolist(),
        "ch_mean": [v if p else ef for v, p in zip(chm, per)],
        "ch_var": [v if p else ef for v, p in zip(chv, per)],
        "active": [v if p and h else ei for v, p, h in zip(acts, per, act_have)],
        "hist": [v if h else ei for v, h in zip(hists, hist_have)],
        "hist_count": hist_n.astype(np.int64).tolist(),
    }


def finish_grad_flat(entries: list[PendingEntry], offs: np.ndarray, host: np.ndarray, tmpls: list) -> dict:
    """:func:`finish_grad` of every entry, as columns."""
    pk = _Packs(entries, offs, host, tmpls)
    n = pk.scalar("n", [e.layout.numel for e in entries])
    n_nan = pk.scalar("n_nan", 0.0)
    n_inf = pk.scalar("n_inf", 0.0)
    sumsq = pk.scalar("sumsq", np.nan)
    seen = n > 0
    nn = np.where(seen, n, 1.0)
    return {
        "count": (n + n_nan + n_inf).astype(np.int64).tolist(),
        "norm": np.sqrt(sumsq).tolist(),
        "rms": np.where(seen, np.sqrt(sumsq / nn), np.nan).tolist(),
        "max_abs": np.where(seen, pk.scalar("max_abs", np.nan), np.nan).tolist(),
        "nan_count": n_nan.astype(np.int64).tolist(),
        "inf_count": n_inf.astype(np.int64).tolist(),
    }
