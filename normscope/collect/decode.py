"""Host side of a sampled step: packs → merged raw fields per entry → rows for the run directory.

Splitting and merging follow the field tables of :mod:`normscope.collect.packs`; this module adds
the entry bookkeeping (:class:`PendingEntry`, :class:`StepAccumulator`) and the derived columns
that the run directory stores (:func:`finish_act`, :func:`finish_grad`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
        sizes = [e.layout.pack_size(e.fast) for e in pending]
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(pending):
            groups.setdefault((e.kind, e.layout, e.fast), []).append(i)
        out = {"act": [None] * len(pending), "grad": [None] * len(pending)}
        for (kind, layout, fast), idx in groups.items():
            rows = host[offs[idx][:, None] + np.arange(layout.pack_size(fast))]
            cols = finish_act_many(rows, layout, fast) if kind == "act" else finish_grad_many(rows, layout, fast)
            names = list(cols)
            for j, i in enumerate(idx):
                out[kind][i] = [cols[c][j] for c in names]
            out.setdefault(kind + "_names", names)
        self._columns = (pending, out)
        return int(offs[-1])

    def _write_columns(self, writer, step: int) -> None:
        pending, out = self._columns
        for kind, table in (("act", "stats"), ("grad", "grads")):
            idx = [i for i, v in enumerate(out[kind]) if v is not None]
            if not idx:
                continue
            names = out[kind + "_names"]
            cols = {c: [out[kind][i][k] for i in idx] for k, c in enumerate(names)}
            es = [pending[i] for i in idx]
            cols["step"] = [step] * len(es)
            cols["phase"] = [e.key[0] for e in es]
            cols["layer"] = [e.key[1] for e in es]
            cols["call"] = [e.key[2] for e in es]
            cols["output"] = [e.key[3] for e in es]
            if kind == "act":
                cols["module_type"] = [e.module_type for e in es]
                cols["channel_axis"] = [e.layout.axis for e in es]
                cols["forwards"] = [1] * len(es)
            writer.extend(table, cols)

    def write(self, writer, step: int) -> None:
        if self._columns is not None:
            self._write_columns(writer, step)
        for key, ent in self.acts.items():
            row = finish_act(ent.raw, ent.per_channel)
            phase, layer, call, path = key
            row.update(step=step, phase=phase, layer=layer, call=call, output=path, module_type=ent.module_type,
                       channel_axis=ent.axis, forwards=ent.forwards)  # fmt: skip
            writer.append("stats", row)
        for key, raw in self.grads.items():
            row = finish_grad(raw)
            phase, layer, call, path = key
            row.update(step=step, phase=phase, layer=layer, call=call, output=path)
            writer.append("grads", row)


def expand_pending(pending: list[PendingEntry]) -> list[torch.Tensor]:
    """Every pack in the full layout (device ops): what one rank keeps when the ranks disagree."""
    return [P.expand(e.pack, e.layout, e.fast) for e in pending]


def entry_signature(pending: list[PendingEntry]) -> list[tuple]:
    # full-layout sizes: fixed by shapes, equal on every rank
    return [(e.kind, e.key, e.full_size) for e in pending]


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


# --- column-wise: many packs of one layout at once (rows of a 2-D host array) ------------------


def _raw_many(rows: np.ndarray, layout, fast: bool) -> dict:
    """Raw fields of ``rows`` (m packs of one layout): scalars (m,), vectors (m, width); the fields
    a fast pack leaves out as :func:`packs._derived` gives them (broadcastable)."""
    sl = P.slices(layout, fast)
    out = {}
    for f in P._ordered(layout.fields, fast):
        v = rows[:, sl[f.name]]
        out[f.name] = v[:, 0] if f.width == "1" else v
    if fast:
        d = P._derived(layout, {}, np)
        if "hist" in out:
            d["hist_n"] = out["hist"].sum(1)
        if "cnt" in d:
            d["cnt"] = d["cnt"][None, :]
        out.update(d)
    return out


def finish_act_many(rows: np.ndarray, layout: ActLayout, fast: bool) -> dict:
    """:func:`finish_act` of each pack in ``rows`` (m × pack size, one layout), as columns: the
    same values, one numpy pass per field instead of one per field per row."""
    r = _raw_many(rows, layout, fast)
    m = rows.shape[0]
    n = np.broadcast_to(np.asarray(r["n"], np.float64), (m,))
    cnt, s1, m2 = np.broadcast_to(r["cnt"], r["s1"].shape), r["s1"], r["m2"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ch_mean = np.where(cnt > 0, s1 / np.maximum(cnt, 1), np.nan)
        ch_var = np.where(cnt > 0, m2 / np.maximum(cnt, 1), np.nan)
        seen = n > 0
        nn = np.where(seen, n, 1.0)
        mean = s1.sum(1) / nn
        m2_all = m2.sum(1) + (cnt * (np.nan_to_num(ch_mean) - mean[:, None]) ** 2).sum(1)
        std = np.sqrt(np.maximum(m2_all / nn, 0.0))

    def nan_unseen(v):
        return np.where(seen, v, np.nan).tolist()

    def frac(k):
        return nan_unseen(r[k] / nn) if k in r else [math.nan] * m

    def ints(v):
        return np.broadcast_to(np.asarray(v), (m,)).astype(np.int64).tolist()

    nan_c, inf_c = ints(r["n_nan"]), ints(r["n_inf"])
    empty_f, empty_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    per = layout.per_channel
    has_active, has_hist = "active" in r, "hist" in r
    return {
        "count": (np.broadcast_to(n, (m,)) + np.asarray(r["n_nan"]) + np.asarray(r["n_inf"])).astype(np.int64).tolist(),
        "samples": ints(r["samples"]),
        "mean": nan_unseen(mean),
        "std": nan_unseen(std),
        "min": nan_unseen(r["min"]),
        "max": nan_unseen(r["max"]),
        "mean_abs": frac("abs_sum"),
        "frac_zero": frac("n_zero"),
        "frac_nonpos": frac("n_nonpos"),
        "frac_sat": frac("n_sat"),
        "nan_count": nan_c,
        "inf_count": inf_c,
        "ch_mean": list(ch_mean.astype(np.float32)) if per else [empty_f] * m,
        "ch_var": list(ch_var.astype(np.float32)) if per else [empty_f] * m,
        "active": list(r["active"].astype(np.int64)) if per and has_active else [empty_i] * m,
        "hist": list(r["hist"].astype(np.int64)) if has_hist else [empty_i] * m,
        "hist_count": ints(r["hist_n"]) if has_hist else [0] * m,
    }


def finish_grad_many(rows: np.ndarray, layout: GradLayout, fast: bool) -> dict:
    """:func:`finish_grad` of each pack in ``rows`` (m × pack size, one layout), as columns."""
    r = _raw_many(rows, layout, fast)
    m = rows.shape[0]
    n = np.broadcast_to(np.asarray(r["n"], np.float64), (m,))
    seen = n > 0
    nn = np.where(seen, n, 1.0)
    nan_c = np.broadcast_to(np.asarray(r["n_nan"]), (m,))
    inf_c = np.broadcast_to(np.asarray(r["n_inf"]), (m,))
    return {
        "count": (n + nan_c + inf_c).astype(np.int64).tolist(),
        "norm": np.sqrt(r["sumsq"]).tolist(),
        "rms": np.where(seen, np.sqrt(r["sumsq"] / nn), np.nan).tolist(),
        "max_abs": np.where(seen, r["max_abs"], np.nan).tolist(),
        "nan_count": nan_c.astype(np.int64).tolist(),
        "inf_count": inf_c.astype(np.int64).tolist(),
    }
