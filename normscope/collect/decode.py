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

    def decode(self, pending: list[PendingEntry], host: np.ndarray, full: bool = False) -> int:
        """Split one host vector laid out like ``pending``; ``full``: every pack in the full layout."""
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

    def write(self, writer, step: int) -> None:
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
