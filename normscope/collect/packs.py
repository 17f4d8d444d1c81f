"""The pack layout, declared once: which fields a reducer writes, in what order, and how packs combine.

A *pack* is the small 1-D float64 tensor one reducer call produces (one hooked output, or one
gradient). Its layout follows from shapes alone, so a sampled step's packs are concatenated,
copied to the host once and split there without any per-pack header. Every place that writes,
splits, expands or merges packs reads the tables below (:data:`ACT_FIELDS`, :data:`GRAD_FIELDS`);
adding a statistic means adding a :class:`Field` here and computing it in the reducer.

Each field declares
- ``width``: ``"1"`` (one value), ``"C"`` (one per channel) or ``"H"`` (one per histogram bin);
- ``merge``: how two packs of the same entry combine (micro-batches, eval batches, ranks):
  ``"sum"``, ``"min"``, ``"max"``, or ``"chan"`` (a per-channel sum of squared deviations,
  merged with Chan's parallel formula from the ``cnt`` and ``s1`` fields);
- ``fast``: whether the CPU fast pack (all-finite tensors) carries it; the others are known on
  the host from the layout (:func:`_derived`), which saves device work;
- ``level``: the least ``stats=`` preset (:data:`PRESETS`) that records it. A layout's
  ``fields`` are those of its preset: a field absent from a pack was not computed, and decoding
  stores NaN (scalars) or an empty list (vectors) for what derives from it.

Presets: ``"minimal"`` records the moments (min, max, mean, std, as one channel) and the
non-finite counts; ``"standard"`` (the default) adds mean |x|, zero / non-positive / saturated
fractions, per-channel moments, activity and the histogram; ``"full"`` records the same fields
as ``"standard"``, its histogram over every element instead of a bounded subsample (the
collector's ``hist_max=0``).

Scalar fields come first (in table order), then the vector fields (in table order).

Across ranks (:mod:`normscope.collect.distributed`) the same table drives the reductions, whose
size depends on the layouts only, never on the world size: every ``sum`` field, and each
``chan`` field as a sum of squared deviations about a shift K that all ranks share
(Σ(x−K)² = m2 + cnt·(mean−K)², additive), go into one SUM buffer (:func:`sum_part`); ``max``
fields, and ``min`` fields negated, into one MAX buffer (:func:`ext_part`); :func:`from_reduced`
rebuilds every raw field, with m2 = Σ(x−K)² − N·(M−K)² about the global mean M.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

PRESETS = ("minimal", "standard", "full")
DEFAULT_PRESET = "standard"


@dataclass(frozen=True)
class Field:
    name: str
    width: str  # "1" | "C" | "H"
    merge: str  # "sum" | "min" | "max" | "chan"
    fast: bool  # carried by the fast pack
    level: str = "minimal"  # the least preset that records it


ACT_FIELDS: tuple[Field, ...] = (
    Field("n", "1", "sum", False),  # finite elements
    Field("min", "1", "min", True),
    Field("max", "1", "max", True),
    Field("abs_sum", "1", "sum", True, "standard"),
    Field("n_zero", "1", "sum", True, "standard"),
    Field("n_nonpos", "1", "sum", True, "standard"),
    Field("n_sat", "1", "sum", True, "standard"),
    Field("n_nan", "1", "sum", False),
    Field("n_inf", "1", "sum", False),
    Field("hist_n", "1", "sum", False, "standard"),  # elements in the histogram subsample
    Field("samples", "1", "sum", False),
    Field("cnt", "C", "sum", False),  # finite elements per channel
    Field("s1", "C", "sum", True),  # per-channel sum
    Field("m2", "C", "chan", True),  # per-channel sum of squared deviations from the channel mean
    Field("active", "C", "sum", True, "standard"),  # samples in which the unit was > 0
    Field("hist", "H", "sum", True, "standard"),
)


@lru_cache(maxsize=8)
def preset_fields(stats: str, fields: tuple[Field, ...] = ACT_FIELDS) -> tuple[Field, ...]:
    """The fields a preset records (table order)."""
    if stats not in PRESETS:
        raise ValueError(f"unknown stats preset {stats!r}: one of {', '.join(PRESETS)}")
    rank = PRESETS.index(stats)
    return tuple(f for f in fields if PRESETS.index(f.level) <= rank)


GRAD_FIELDS: tuple[Field, ...] = (
    Field("n", "1", "sum", False),
    Field("sumsq", "1", "sum", True),
    Field("max_abs", "1", "max", True),
    Field("n_nan", "1", "sum", False),
    Field("n_inf", "1", "sum", False),
)


@dataclass(frozen=True)
class ActLayout:
    """Shape facts that fix an activation pack's layout."""

    numel: int
    channels: int
    samples: int
    axis: int
    hist_bins: int
    per_channel: bool = True  # False: channels above ``max_channels``, reduced as one channel
    stats: str = DEFAULT_PRESET  # the preset: which fields the pack carries

    @property
    def fields(self) -> tuple[Field, ...]:
        return preset_fields(self.stats)

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def width(self, f: Field) -> int:
        return 1 if f.width == "1" else self.channels if f.width == "C" else self.hist_bins

    @property
    def size(self) -> int:
        return pack_size(self, False)

    @property
    def fast_size(self) -> int:
        return pack_size(self, True)

    def pack_size(self, fast: bool) -> int:
        return pack_size(self, fast)


@dataclass(frozen=True)
class GradLayout:
    numel: int

    fields = GRAD_FIELDS

    def width(self, f: Field) -> int:
        return 1

    @property
    def size(self) -> int:
        return pack_size(self, False)

    def pack_size(self, fast: bool) -> int:
        return pack_size(self, fast)


@lru_cache(maxsize=64)
def _ordered(fields: tuple[Field, ...], fast: bool) -> tuple[Field, ...]:
    chosen = [f for f in fields if f.fast or not fast]
    return tuple([f for f in chosen if f.width == "1"] + [f for f in chosen if f.width != "1"])


@lru_cache(maxsize=4096)
def slices(layout, fast: bool) -> dict[str, slice]:
    """Where each field sits in a pack of ``layout`` (fast or full)."""
    out, o = {}, 0
    for f in _ordered(layout.fields, fast):
        w = layout.width(f)
        out[f.name] = slice(o, o + w)
        o += w
    return out


def pack_size(layout, fast: bool) -> int:
    return sum(layout.width(f) for f in _ordered(layout.fields, fast))


def assemble(layout, fast: bool, values: dict, dtype=torch.float64) -> torch.Tensor:
    """One pack from named tensors (scalars 0-d, vectors 1-d), in the table's order."""
    order = _ordered(layout.fields, fast)
    scal = [values[f.name].to(dtype) for f in order if f.width == "1"]
    vecs = [values[f.name].to(dtype) for f in order if f.width != "1"]
    parts = ([torch.stack(scal)] if scal else []) + vecs
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def assemble_host(layout, fast: bool, scalars: dict, vectors: dict, dtype=torch.float64) -> torch.Tensor:
    """One float64 pack from host scalars (Python floats, CPU fast path) and CPU vectors of
    ``dtype``: one small tensor for the scalars, one ``cat`` and one conversion, not an op per
    field (``dtype=float32`` where every value is exact in float32: no conversion per piece)."""
    order = _ordered(layout.fields, fast)
    head = [scalars[f.name] for f in order if f.width == "1"]
    if not vectors:  # every field one host value (one-channel vectors given as floats too)
        return torch.tensor(head + [scalars[f.name] for f in order if f.width != "1"], dtype=torch.float64)
    head = torch.tensor(head, dtype=dtype)
    vecs = [vectors[f.name] for f in order if f.width != "1"]
    out = torch.cat([head, *vecs]) if vecs else head
    return out if out.dtype == torch.float64 else out.to(torch.float64)


def _derived(layout, have: dict, xp):
    """Fields a fast pack leaves out, from the layout (and the fields it has)."""
    if isinstance(layout, GradLayout):
        return {"n": float(layout.numel), "n_nan": 0.0, "n_inf": 0.0}
    c = layout.channels
    out = {"n": float(layout.numel), "n_nan": 0.0, "n_inf": 0.0, "samples": float(layout.samples),
           "cnt": xp.full(c, layout.numel / c)}  # fmt: skip
    if "hist" in have:
        out["hist_n"] = have["hist"].sum()
    return out


class _TorchNS:
    """The two array constructors :func:`_derived` needs, on a device."""

    def __init__(self, like: torch.Tensor):
        self.like = like

    def full(self, n, v):
        return torch.full((n,), float(v), dtype=torch.float64, device=self.like.device)


def _fields_of(pack, layout, fast: bool) -> dict:
    out = {}
    for f in _ordered(layout.fields, fast):
        v = pack[slices(layout, fast)[f.name]]
        out[f.name] = v[0] if f.width == "1" else v
    return out


def split(pack: np.ndarray, layout, fast: bool = False) -> dict:
    """Raw (combinable) fields of one host pack, every field of the table present."""
    out = _fields_of(pack, layout, fast)
    if fast:
        out.update(_derived(layout, out, np))
    return out


def expand(pack: torch.Tensor, layout, fast: bool) -> torch.Tensor:
    """A fast pack in the full layout, on its device (so packs from several ranks line up)."""
    if not fast:
        return pack
    vals = _fields_of(pack, layout, True)
    for k, v in _derived(layout, vals, _TorchNS(pack)).items():
        vals[k] = v if isinstance(v, torch.Tensor) else pack.new_tensor(v)
    return assemble(layout, False, vals)


def combine(a: dict, b: dict, fields: tuple[Field, ...] = ACT_FIELDS) -> dict:
    """Merge the raw fields of two packs of one entry, field by field as the table declares
    (fields absent from either, not computed under their preset, stay absent)."""
    if "cnt" in a and np.shape(a["cnt"]) != np.shape(b["cnt"]):
        raise ValueError("channel count changed between forwards")
    out = {}
    for f in fields:
        if f.name not in a or f.name not in b:
            continue
        x, y = a[f.name], b[f.name]
        if f.merge == "sum":
            out[f.name] = x + y
        elif f.merge == "min":
            out[f.name] = min(x, y)
        elif f.merge == "max":
            out[f.name] = max(x, y)
        else:  # "chan": Chan et al.'s parallel update of the sum of squared deviations
            na, nb = a["cnt"], b["cnt"]
            n = na + nb
            with np.errstate(invalid="ignore", divide="ignore"):
                mb = np.where(nb > 0, b["s1"] / np.maximum(nb, 1), 0)
                ma = np.where(na > 0, a["s1"] / np.maximum(na, 1), 0)
                delta = mb - ma
                extra = np.where(n > 0, delta * delta * na * nb / np.maximum(n, 1), 0)
            out[f.name] = x + y + extra
    return out


# --- cross-rank reduction: the SUM and MAX buffers, by the table's merge rules --------------------


def sum_width(layout) -> int:
    """Values one entry puts in the SUM buffer (``sum`` and ``chan`` fields)."""
    return sum(layout.width(f) for f in layout.fields if f.merge in ("sum", "chan"))


def ext_width(layout) -> int:
    """Values one entry puts in the MAX buffer (``max`` fields, and ``min`` fields negated)."""
    return sum(layout.width(f) for f in layout.fields if f.merge in ("min", "max"))


def _shifted_sq(stacked: torch.Tensor, sl: dict, f: Field, shift: torch.Tensor | None) -> torch.Tensor:
    """Σ over the stacked packs of Σ(x−K)² = m2 + cnt·(mean−K)² (0 where a pack saw nothing)."""
    cnt, s1 = stacked[:, sl["cnt"]], stacked[:, sl["s1"]]
    mean = torch.where(cnt > 0, s1 / cnt.clamp_min(1), torch.zeros_like(s1))
    d = mean if shift is None else mean - shift
    return (stacked[:, sl[f.name]] + cnt * d * d).sum(0)


def sum_part(stacked: torch.Tensor, layout, shift: torch.Tensor | None = None) -> torch.Tensor:
    """One entry's SUM-buffer values from its local full-layout packs ``stacked`` (k × size), on device."""
    sl = slices(layout, False)
    out = []
    for f in layout.fields:
        if f.merge == "sum":
            out.append(stacked[:, sl[f.name]].sum(0))
        elif f.merge == "chan":
            out.append(_shifted_sq(stacked, sl, f, shift))
    return torch.cat(out)


def chan_part(stacked: torch.Tensor, layout, shift: torch.Tensor) -> torch.Tensor:
    """The ``chan`` fields alone about another shift (the second pass, about the global mean)."""
    sl = slices(layout, False)
    return torch.cat([_shifted_sq(stacked, sl, f, shift) for f in layout.fields if f.merge == "chan"])


def ext_part(stacked: torch.Tensor, layout) -> torch.Tensor:
    sl = slices(layout, False)
    out = []
    for f in layout.fields:
        if f.merge == "max":
            out.append(stacked[:, sl[f.name]].amax(0))
        elif f.merge == "min":
            out.append(-stacked[:, sl[f.name]].amin(0))
    return torch.cat(out)


def reduced_fields(sums, exts, layout) -> dict:
    """Named views of one entry's reduced SUM and MAX values (numpy or torch); ``chan`` fields
    still hold Σ(x−K)², min fields are back to minima."""
    out, o, e = {}, 0, 0
    for f in layout.fields:
        w = layout.width(f)
        if f.merge in ("sum", "chan"):
            v = sums[o : o + w]
            o += w
        else:
            v = exts[e : e + w]
            e += w
            v = -v if f.merge == "min" else v
        out[f.name] = v[0] if f.width == "1" else v
    return out


def global_mean(r: dict, xp=np):
    """Per-channel mean of reduced fields (0 where no element was seen)."""
    cnt = r["cnt"]
    return xp.where(cnt > 0, r["s1"] / xp.maximum(cnt, cnt * 0 + 1), cnt * 0)


def m2_about_mean(q, r: dict, shift, xp=np):
    """m2 = Σ(x−K)² − N·(M−K)² and the cancellation ratio N·(M−K)² / m2 (large: digits lost)."""
    d = global_mean(r, xp) - (0 if shift is None else shift)
    corr = r["cnt"] * d * d
    m2 = q - corr
    m2 = xp.where(m2 > 0, m2, m2 * 0)
    return m2, corr / xp.where(m2 > 0, m2, m2 * 0 + 1e-300)


def from_reduced(sums, exts, layout, shift=None) -> dict:
    """Raw (combinable) fields of one entry from its reduced buffers, on the host (numpy)."""
    r = reduced_fields(sums, exts, layout)
    for f in layout.fields:
        if f.merge == "chan":
            r[f.name] = m2_about_mean(r[f.name], r, shift)[0]
    return r
