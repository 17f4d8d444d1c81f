"""On-device reducers: one tensor in, one small packed float64 tensor out.

Everything here runs inside a hook, on the tensor's device, and never synchronises with the
host on accelerators. Each reducer returns a 1-D float64 "pack" whose layout is fully known on
the host from shapes alone (the field tables of :mod:`normscope.collect.packs`), so a whole sampled
step is concatenated and copied to the host once, then split and merged by those tables
(:mod:`normscope.collect.decode`, numpy, float64).

Speed (CPU): a comparison followed by a sum (``(x <= 0).sum()``) costs ~10x a plain sum, and a
fresh large allocation page-faults, so the fast path derives every count from ``sign(x)`` written
into a reused scratch buffer, global moments from per-channel ones, and the histogram from a
bounded, deterministic subsample. On the CPU the host *is* the device, so a cheap finiteness test
(``aminmax``) picks the fast path; on accelerators the masked path (correct for NaN/Inf) always
runs, branch-free. On small activations (many small layers) the fixed cost of each op dominates,
so the fast path (:func:`_reduce_act_fast`) keeps the op count low: per-channel sums as BLAS
matrix-vector products at any layout, scalars read on the host and the pack built by one
``cat`` (~20 ops per tensor; the tensors of ≥ 2**23 elements keep the float64-count path).

Semantics (also the contract the tests check against numpy):
- moments, min/max, mean |x|, zero / non-positive / saturated counts, per-channel statistics,
  activity and the histogram cover the finite elements; NaN and Inf are counted apart;
- per-channel variance and the global std are population (ddof=0) values;
- ``active[c]`` counts samples in which unit c is > 0 at least once (a sample is a row of the
  leading axes for channel-last layouts, one item of the batch for channel-first ones);
- the histogram is over ``x.flatten()[::stride]`` where ``stride`` is the smallest prime ≥
  ``ceil(numel / hist_max)`` (1 when numel ≤ hist_max); primes avoid aliasing with the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from normscope.collect.packs import ActLayout, GradLayout, assemble, assemble_host

__all__ = ["ActLayout", "GradLayout", "HistSpec", "SatSpec", "Scratch", "act_layout", "reduce_act", "reduce_grad"]

# --- histogram bins ------------------------------------------------------------------------
# "symlog": one bin per octave of |x| from 2**-20 (~1e-6) to 2**14 (16384) on each sign, a
# central bin for |x| < 2**-20 (zeros, subnormals) and an overflow bin on each side (±Inf land
# there). Power-of-two edges are read straight from the float's exponent bits: exact and cheap.
# Fixed for every layer and step, so histograms compare across layers and over time.
SYMLOG_LO_EXP = -20
SYMLOG_HI_EXP = 14
_SYMLOG_K = SYMLOG_HI_EXP - SYMLOG_LO_EXP  # 34 octave bins per side
SYMLOG_BINS = 2 * (_SYMLOG_K + 1) + 1  # 71
LINEAR_BINS = 64

# Saturation kinds (CHECKS.md): sigmoid y < 0.01 or y > 0.99; tanh |y| > 0.97; hardtanh-family
# at its bounds (y <= lo or y >= hi).
SIGMOID_LO, SIGMOID_HI = 0.01, 0.99
TANH_T = 0.97

# The pack layout (fields, order, merge rules, what the fast path leaves out) is declared once,
# in normscope.collect.packs; the reducers fill its fields by name.
FORCE_MASKED = False  # tests: exercise the NaN-safe (accelerator) path on the CPU


def symlog_edges() -> np.ndarray:
    """Edges of the symlog histogram: len == SYMLOG_BINS + 1 (outer edges are ±inf).

    Bins are [2**k, 2**(k+1)) on the positive side and (-2**(k+1), -2**k] on the negative side.
    """
    mags = 2.0 ** np.arange(SYMLOG_LO_EXP, SYMLOG_HI_EXP + 1)
    return np.concatenate([[-np.inf], -mags[::-1], mags, [np.inf]])


def linear_edges(lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi, LINEAR_BINS + 1)


@dataclass(frozen=True)
class HistSpec:
    kind: str  # "symlog" or "linear"
    lo: float = 0.0
    hi: float = 0.0

    @property
    def bins(self) -> int:
        return SYMLOG_BINS if self.kind == "symlog" else LINEAR_BINS

    def edges(self) -> np.ndarray:
        return symlog_edges() if self.kind == "symlog" else linear_edges(self.lo, self.hi)

    def to_json(self) -> dict:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "edges": _json_edges(self.edges())}


def _json_edges(e: np.ndarray) -> list:
    return [None if not math.isfinite(v) else float(v) for v in e]


@dataclass(frozen=True)
class SatSpec:
    kind: str  # "sigmoid", "tanh", "bounds"
    lo: float = 0.0
    hi: float = 0.0


@lru_cache(maxsize=256)
def hist_stride(numel: int, hist_max: int) -> int:
    if hist_max <= 0 or numel <= hist_max:
        return 1
    s = max(2, -(-numel // hist_max))
    while not _is_prime(s):
        s += 1
    return s


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def channel_view_shape(shape: torch.Size, axis: int) -> tuple[int, int, int]:
    """(A, C, S): leading product, channels, trailing product for a channel axis."""
    nd = len(shape)
    if nd == 0:
        return 1, 1, 1
    a = axis % nd
    lead = math.prod(shape[:a])
    trail = math.prod(shape[a + 1 :])
    return lead, shape[a], trail


class Scratch:
    """Reusable float32 work buffers, one per device, grown to the largest tensor seen.

    Avoids a fresh (page-faulting) allocation per statistic; memory is one activation's size.
    """

    def __init__(self) -> None:
        self._bufs: dict[torch.device, torch.Tensor] = {}
        self._ones: dict[tuple, torch.Tensor] = {}

    def get(self, numel: int, device: torch.device) -> torch.Tensor:
        buf = self._bufs.get(device)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._bufs[device] = buf
        return buf[:numel]

    def ones(self, n: int, device: torch.device) -> torch.Tensor:
        key = ("ones", device)
        buf = self._ones.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.ones(max(n, 1), dtype=torch.float32, device=device)
            self._ones[key] = buf
        return buf[:n]

    def clear(self) -> None:
        self._bufs.clear()
        self._ones.clear()


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    return x


def _hist_index(y: torch.Tensor, spec: HistSpec) -> torch.Tensor:
    """Bin index (int32) of every element of the 1-D float32 tensor y (±Inf: outer bins)."""
    if spec.kind == "symlog":
        bits = y.view(torch.int32)
        k = (bits >> 23).bitwise_and_(0xFF).sub_(127 + SYMLOG_LO_EXP - 1).clamp_(0, _SYMLOG_K + 1)
        neg = bits >> 31  # -1 for a set sign bit, else 0: (k ^ neg) - neg == ±k without a branch
        return k.bitwise_xor_(neg).sub_(neg).add_(_SYMLOG_K + 1)
    idx = (y - spec.lo).mul_(LINEAR_BINS / (spec.hi - spec.lo)).floor_().clamp_(0, LINEAR_BINS - 1)
    return idx.to(torch.int32)


def _hist(x: torch.Tensor, spec: HistSpec, hist_max: int, finite: torch.Tensor | None):
    flat = x.view(-1)
    stride = hist_stride(flat.numel(), hist_max)
    y = flat[::stride].contiguous() if stride > 1 else flat
    if finite is None:
        h = torch.bincount(_hist_index(y, spec), minlength=spec.bins)
        return h, y.new_tensor(float(y.numel()))
    fs = finite.view(-1)[::stride] if stride > 1 else finite.view(-1)
    w = fs.to(torch.float32)
    yz = torch.where(fs, y, torch.zeros_like(y))
    h = torch.bincount(_hist_index(yz, spec), weights=w, minlength=spec.bins).to(torch.float32)
    return h, w.sum()


def _sat_count(x: torch.Tensor, sat: SatSpec | None, buf: torch.Tensor | None) -> torch.Tensor:
    if sat is None:
        return x.new_zeros(())
    if sat.kind == "sigmoid":
        lo_op, hi_op, lo, hi = torch.lt, torch.gt, SIGMOID_LO, SIGMOID_HI
    elif sat.kind == "tanh":
        lo_op, hi_op, lo, hi = torch.lt, torch.gt, -TANH_T, TANH_T
    else:
        lo_op, hi_op, lo, hi = torch.le, torch.ge, sat.lo, sat.hi
    if buf is None:  # masked path: x has non-finite entries already replaced, mask applied by caller
        return lo_op(x, lo).sum() + hi_op(x, hi).sum()
    buf = buf.view(x.shape)
    c = lo_op(x, lo, out=buf).sum()
    return c + hi_op(x, hi, out=buf).sum()


def act_layout(
    x: torch.Tensor, axis: int, spec: HistSpec, max_channels: int | None = None, stats: str = "standard"
) -> ActLayout:
    """The layout of ``x``'s pack; above ``max_channels`` channels the tensor is reduced as one
    channel (global statistics exact, no per-channel ones). ``stats="minimal"``: always one
    channel and no histogram (packs.preset_fields says what each preset records)."""
    a, c, s = channel_view_shape(x.shape, axis)
    if stats == "minimal":
        return ActLayout(numel=x.numel(), channels=1, samples=a, axis=axis, hist_bins=0, per_channel=False,
                         stats=stats)  # fmt: skip
    if max_channels is not None and c > max_channels:
        return ActLayout(numel=x.numel(), channels=1, samples=a, axis=axis, hist_bins=spec.bins, per_channel=False,
                         stats=stats)  # fmt: skip
    return ActLayout(numel=x.numel(), channels=c, samples=a, axis=axis, hist_bins=spec.bins, stats=stats)


def reduce_act(
    x: torch.Tensor,
    layout: ActLayout,
    hist: HistSpec,
    sat: SatSpec | None,
    hist_max: int,
    scratch: Scratch,
    force_masked: bool | None = None,
) -> tuple[torch.Tensor, bool]:
    """All forward statistics of one output tensor: ``(pack, fast)``.

    The pack is 1-D of ``layout.pack_size(fast)`` elements; ``fast`` is a host bool (the CPU
    path for all-finite tensors), so decoding never waits on the device.
    """
    if force_masked is None:
        force_masked = FORCE_MASKED
    xf = _as_f32(x)
    if not layout.per_channel:  # one channel: (samples, 1, rest), the pack's own layout unchanged
        a, c, s = channel_view_shape(xf.shape, layout.axis)
        xf, layout = xf.reshape(a, 1, c * s), replace(layout, axis=1, per_channel=True)
    if _autocast_on(xf.device.type):  # hooks run inside the user's autocast: keep float32
        with torch.autocast(xf.device.type, enabled=False):
            return reduce_act(xf, layout, hist, sat, hist_max, scratch, force_masked)
    if xf.device.type == "cpu" and not force_masked:
        mn, mx = torch.aminmax(xf)
        lo = mn.item()  # CPU: reading a value is not a device sync
        if math.isfinite(lo) and math.isfinite(mx.item()):
            if layout.stats == "minimal":
                return _reduce_act_minimal_fast(xf, layout, lo, mx.item(), scratch), True
            if xf.numel() >= _WIDE:
                return _reduce_act_fast_wide(xf, layout, hist, sat, hist_max, scratch, mn, mx, lo >= 0), True
            return _reduce_act_fast(xf, layout, hist, sat, hist_max, scratch, lo, mx.item()), True
    return _reduce_act_masked(xf, layout, hist, sat, hist_max), False


def _colsummer(a: int, device, wide, scratch: Scratch):
    """Column sums of an (A, C) float32 matrix.

    ``ones @ v`` (a BLAS gemv) reads the matrix once and measured 1.3-2x faster than
    ``v.sum(0)`` on (256..32768, 64..4096) shapes; float32 sums of ±1/0 stay exact below 2**24.
    Wide tensors (≥ 2**23 elements) take the float64 ``sum`` path for exact counts.
    """
    if wide is not None:
        return lambda m: m.sum(0, dtype=wide)
    ones = scratch.ones(a, device)
    return lambda m: ones @ m


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4: no per-device query
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _reduce_act_fast_wide(xf, layout, hist, sat, hist_max, scratch, mn, mx, nonneg: bool):
    """The fast path for tensors of ≥ 2**23 elements: float64 sums where counts pass 2**24."""
    a, c, s = channel_view_shape(xf.shape, layout.axis)
    n = xf.numel()
    flat = xf.view(-1)
    buf = scratch.get(n, xf.device)
    wide = torch.float64 if n >= (1 << 23) else None  # exact integer counts past 2**24
    # nonneg (ReLU-family outputs): |x| = x and sign(x) is 0/1, which saves three passes
    if s == 1:  # channel-last: (A, C)
        v = xf.view(a, c)
        colsum = _colsummer(a, xf.device, wide, scratch)
        s1 = colsum(v)
        d = torch.sub(v, (s1 / a).to(v.dtype), out=buf.view(a, c))
        m2 = colsum(d.mul_(d))
        sg = torch.sign(v, out=buf.view(a, c))
        if nonneg:
            active = colsum(sg)
            abs_sum = s1.sum()
            n_nz = n_pos = active.sum()
        else:
            abs_sum = torch.dot(flat, sg.view(-1))
            pmn = colsum(sg)  # positives - negatives, per column
            ppn = colsum(sg.abs_())  # positives + negatives, per column
            active = (pmn + ppn) * 0.5
            n_pos = active.sum()
            n_nz = ppn.sum()
    else:  # channel-first: (A, C, S)
        v = xf.view(a, c, s)
        s1 = v.sum((0, 2), dtype=wide)
        d = torch.sub(v, (s1 / (a * s)).to(v.dtype).view(1, c, 1), out=buf.view(a, c, s))
        m2 = d.mul_(d).sum((0, 2), dtype=wide)
        active = (v.amax(2) > 0).sum(0)
        sg = torch.sign(flat, out=buf)
        if nonneg:
            abs_sum = s1.sum()
            n_nz = n_pos = sg.sum(dtype=wide)
        else:
            abs_sum = torch.dot(flat, sg)
            pmn = sg.sum(dtype=wide)
            n_nz = sg.abs_().sum(dtype=wide)
            n_pos = (pmn + n_nz) * 0.5
    n_sat = _sat_count(xf, sat, buf)
    h, _ = _hist(xf, hist, hist_max, None)
    vals = {"min": mn, "max": mx, "abs_sum": abs_sum, "n_zero": n - n_nz, "n_nonpos": n - n_pos, "n_sat": n_sat,
            "s1": s1, "m2": m2, "active": active, "hist": h}  # fmt: skip
    return assemble(layout, True, vals, dtype=s1.dtype).to(torch.float64)


_WIDE = 1 << 23  # from here on the float64-count path (_reduce_act_fast_wide)
_GEMV_S = 4096  # longest channel run (S) summed by a BLAS dot; beyond it torch's cascade sum


def _chsum(m: torch.Tensor, a: int, c: int, s: int, ones: torch.Tensor) -> torch.Tensor:
    """Per-channel sums (C,) of a contiguous (A, C, S) float32 tensor: two BLAS matrix-vector
    products (``ones_A @ (A, C·S)``, then ``(C, S) @ ones_S``), which read the tensor once at any
    layout; ``v.sum((0, 2))`` measured 2-10x slower on small trailing runs (S ≤ 16)."""
    if s == 1:
        return ones[:a] @ m.view(a, c)
    if s > _GEMV_S:
        return m.view(a, c, s).sum((0, 2))
    return (ones[:a] @ m.view(a, c * s)).view(c, s) @ ones[:s]


def _f32(v: float) -> float:
    """``v`` rounded to float32: the threshold a float32 tensor is compared against."""
    return float(np.float32(v))


def _reduce_act_fast(xf, layout, hist, sat, hist_max, scratch, lo: float, hi: float):
    """All-finite CPU tensors below 2**23 elements, ``lo``/``hi`` their min/max (host floats).

    Few ops per tensor (the fixed cost of an op dominates on small activations): per-channel
    sums as BLAS matrix-vector products (:func:`_chsum`), the mean subtracted with one rank-1
    update (``addr``), every count from ``sign(x)`` written into the scratch buffer, scalars read
    on the host (on the CPU the host is the device) and the pack built by one ``cat``. Float32
    sums of 0/±1 are exact below 2**24.
    """
    a, c, s = channel_view_shape(xf.shape, layout.axis)
    n = xf.numel()
    flat = xf.view(-1)
    buf = scratch.get(n, xf.device)
    ones = scratch.ones(max(a, s), xf.device)
    s1 = _chsum(xf, a, c, s, ones)
    k = -1.0 / (a * s)  # x - mean[c] = x + k * s1[c], one op
    if s == 1:
        d = torch.add(xf.view(a, c), s1, alpha=k, out=buf.view(a, c))
    elif s >= 8 or c == 1:
        d = torch.add(xf.view(a, c, s), s1.view(1, c, 1), alpha=k, out=buf.view(a, c, s))
    else:  # short trailing runs: a broadcast subtraction is slow there, a rank-1 update (BLAS ger) is not
        d = torch.addr(xf.view(a, c * s), ones[:a], s1.repeat_interleave(s), alpha=k, out=buf.view(a, c * s))
    m2 = _chsum(d.mul_(d), a, c, s, ones)
    nonneg = lo >= 0  # ReLU-family outputs: |x| = x and sign(x) is 0/1, which saves three ops
    sg = torch.sign(flat, out=buf)
    if not nonneg:
        abs_sum = torch.dot(flat, sg).item()
        pmn = sg.sum().item()  # positives - negatives
        sg.clamp_min_(0)  # 1 where x > 0
    if s == 1:  # channel-last: a unit is active in a sample when x > 0
        active = ones[:a] @ sg.view(a, c)
        n_pos = active.sum().item()
    else:  # positives per (sample, channel), then the samples with any
        rows = sg.view(a * c, s) @ ones[:s] if s <= _GEMV_S else sg.view(a * c, s).sum(1)
        n_pos = rows.sum().item()
        active = ones[:a] @ rows.clamp_max_(1).view(a, c)  # whole counts: clamped to 1 = "any"
    if nonneg:
        abs_sum = s1.sum().item()
        n_nz = n_pos
    else:
        n_nz = 2 * n_pos - pmn  # positives + negatives
    n_nonpos = n - n_pos
    scal = {"min": lo, "max": hi, "abs_sum": abs_sum, "n_zero": n - n_nz, "n_nonpos": n_nonpos,
            "n_sat": _sat_count_fast(flat, sat, buf, lo, hi, n_nonpos)}  # fmt: skip
    vecs = {"s1": s1, "m2": m2, "active": active, "hist": _hist_fast(flat, hist, hist_max)}
    return assemble_host(layout, True, scal, vecs, torch.float32)  # float32: exact below 2**24


def _sat_count_fast(flat, sat: SatSpec | None, buf, lo: float, hi: float, n_nonpos: float) -> float:
    """Saturated elements of an all-finite tensor whose min/max (``lo``/``hi``) the host knows: a
    side no element reaches costs nothing; ``x <= 0`` is the non-positive count already taken."""
    if sat is None:
        return 0.0
    if sat.kind == "sigmoid":
        lo_op, hi_op, t_lo, t_hi, incl = torch.lt, torch.gt, SIGMOID_LO, SIGMOID_HI, False
    elif sat.kind == "tanh":
        lo_op, hi_op, t_lo, t_hi, incl = torch.lt, torch.gt, -TANH_T, TANH_T, False
    else:
        lo_op, hi_op, t_lo, t_hi, incl = torch.le, torch.ge, sat.lo, sat.hi, True
    f_lo, f_hi = _f32(t_lo), _f32(t_hi)  # the float32 comparison the ops make
    out = 0.0
    if (lo <= f_lo) if incl else (lo < f_lo):
        out += n_nonpos if incl and t_lo == 0.0 else lo_op(flat, t_lo, out=buf).sum().item()
    if (hi >= f_hi) if incl else (hi > f_hi):
        out += hi_op(flat, t_hi, out=buf).sum().item()
    return out


_FOLD: dict = {}


def _symlog_fold(device) -> torch.Tensor:
    """(512, SYMLOG_BINS) 0/1 matrix: (sign bit, exponent) code ``(bits >> 23) + 256`` → symlog bin."""
    m = _FOLD.get(device)
    if m is None:
        u = np.arange(512)
        e = u % 256  # the biased exponent; u < 256: negative floats (arithmetic shift)
        k = np.clip(e - (127 + SYMLOG_LO_EXP - 1), 0, _SYMLOG_K + 1)
        idx = np.where(u >= 256, _SYMLOG_K + 1 + k, _SYMLOG_K + 1 - k)
        f = np.zeros((512, SYMLOG_BINS), np.float32)
        f[u, idx] = 1.0
        m = _FOLD[device] = torch.from_numpy(f).to(device)
    return m


def _hist_fast(flat: torch.Tensor, spec: HistSpec, hist_max: int) -> torch.Tensor:
    """The histogram of an all-finite flat float32 tensor's subsample, bins as :func:`_hist_index`:
    symlog from one shift and one 512-bin count of (sign, exponent), folded by a 0/1 matrix
    product (exact: counts < 2**24); linear without the ``floor`` (truncation equals it once
    clamped to [0, bins-1])."""
    stride = hist_stride(flat.numel(), hist_max)
    y = flat[::stride] if stride > 1 else flat  # a strided view: the first op reads it, no copy
    if spec.kind == "symlog":
        code = (y.view(torch.int32) >> 23).add_(256)
        return torch.bincount(code, minlength=512).to(torch.float32) @ _symlog_fold(y.device)
    idx = (y - spec.lo).mul_(LINEAR_BINS / (spec.hi - spec.lo)).clamp_(0, LINEAR_BINS - 1)
    return torch.bincount(idx.to(torch.int32), minlength=LINEAR_BINS).to(torch.float32)


def _reduce_act_minimal_fast(xf, layout, lo: float, hi: float, scratch: Scratch):
    """stats="minimal", all finite (CPU): min/max (already read on the host), the sum and the sum
    of squared deviations, as one channel; two passes, four ops, the pack from host floats."""
    wide = torch.float64 if xf.numel() >= _WIDE else None
    flat = xf.view(-1)
    s1 = flat.sum(dtype=wide)
    if wide is None:
        d = torch.add(flat, s1, alpha=-1.0 / max(flat.numel(), 1), out=scratch.get(flat.numel(), xf.device))
        m2 = torch.dot(d, d).item()
    else:
        d = flat - (s1 / max(flat.numel(), 1)).to(flat.dtype)
        m2 = d.double().pow_(2).sum().item()
    return assemble_host(layout, True, {"min": lo, "max": hi, "s1": s1.item(), "m2": m2}, {})


def _reduce_act_masked(xf, layout, hist, sat, hist_max):
    a, c, s = channel_view_shape(xf.shape, layout.axis)
    if layout.stats == "minimal":
        return _reduce_act_minimal_masked(xf, layout, a)
    fin = torch.isfinite(xf)
    zero = torch.zeros((), dtype=xf.dtype, device=xf.device)
    xz = torch.where(fin, xf, zero)
    v = xz.view(a, c, s)
    fv = fin.view(a, c, s)
    cnt = fv.sum((0, 2), dtype=torch.float64)
    s1 = v.sum((0, 2), dtype=torch.float64)
    mean = torch.where(cnt > 0, s1 / cnt.clamp_min(1), torch.zeros_like(s1))
    d = torch.where(fv, v.double() - mean.view(1, c, 1), torch.zeros((), dtype=torch.float64, device=xf.device))
    m2 = (d * d).sum((0, 2))
    inf = torch.tensor(math.inf, dtype=xf.dtype, device=xf.device)
    mn = torch.where(fin, xf, inf).amin()
    mx = torch.where(fin, xf, -inf).amax()
    abs_sum = xz.abs().sum(dtype=torch.float64)
    n_fin = fin.sum(dtype=torch.float64)
    n_zero = ((xf == 0) & fin).sum(dtype=torch.float64)
    n_nonpos = ((xf <= 0) & fin).sum(dtype=torch.float64)
    n_nan = torch.isnan(xf).sum(dtype=torch.float64)
    n_inf = torch.isinf(xf).sum(dtype=torch.float64)
    active = (v > 0).any(2).sum(0, dtype=torch.float64)
    n_sat = (
        ((_sat_mask(xf, sat)) & fin).sum(dtype=torch.float64)
        if sat is not None
        else torch.zeros((), dtype=torch.float64, device=xf.device)
    )
    h, hn = _hist(xf, hist, hist_max, fin)
    vals = {"n": n_fin, "min": mn, "max": mx, "abs_sum": abs_sum, "n_zero": n_zero, "n_nonpos": n_nonpos,
            "n_sat": n_sat, "n_nan": n_nan, "n_inf": n_inf, "hist_n": hn,
            "samples": torch.tensor(float(a), dtype=torch.float64, device=xf.device),
            "cnt": cnt, "s1": s1, "m2": m2, "active": active, "hist": h}  # fmt: skip
    return assemble(layout, False, vals)


def _reduce_act_minimal_masked(xf, layout, a):
    """stats="minimal", NaN-safe (accelerators, non-finite tensors): moments and counts only."""
    fin = torch.isfinite(xf).view(-1)
    flat = xf.view(-1)
    xz = torch.where(fin, flat, torch.zeros((), dtype=xf.dtype, device=xf.device))
    cnt = fin.sum(dtype=torch.float64)
    s1 = xz.sum(dtype=torch.float64)
    d = torch.where(fin, xz.double() - s1 / cnt.clamp_min(1), torch.zeros((), dtype=torch.float64, device=xf.device))
    inf = torch.tensor(math.inf, dtype=xf.dtype, device=xf.device)
    n_nan = torch.isnan(flat).sum(dtype=torch.float64)
    vals = {"n": cnt, "min": torch.where(fin, flat, inf).amin(), "max": torch.where(fin, flat, -inf).amax(),
            "n_nan": n_nan, "n_inf": flat.numel() - cnt - n_nan,
            "samples": torch.tensor(float(a), dtype=torch.float64, device=xf.device),
            "cnt": cnt.view(1), "s1": s1.view(1), "m2": (d * d).sum().view(1)}  # fmt: skip
    return assemble(layout, False, vals)


def _sat_mask(x: torch.Tensor, sat: SatSpec) -> torch.Tensor:
    if sat.kind == "sigmoid":
        return (x < SIGMOID_LO) | (x > SIGMOID_HI)
    if sat.kind == "tanh":
        return (x < -TANH_T) | (x > TANH_T)
    return (x <= sat.lo) | (x >= sat.hi)


def reduce_grad(g: torch.Tensor, force_masked: bool | None = None) -> tuple[torch.Tensor, bool]:
    """Gradient statistics ``(pack, fast)`` in the layout of ``packs.GRAD_FIELDS``.

    Fast (CPU, finite): sum of squares and max |g| only; else also the finite, NaN and Inf
    counts. Always float64.
    """
    if force_masked is None:
        force_masked = FORCE_MASKED
    gf = _as_f32(g)
    n = gf.numel()
    layout = GradLayout(n)
    if gf.device.type == "cpu" and not force_masked:  # host floats and one small tensor: three ops
        nrm = torch.linalg.vector_norm(gf).item()
        if math.isfinite(nrm):
            mn, mx = torch.aminmax(gf) if n else (gf.new_zeros(()), gf.new_zeros(()))
            return assemble_host(layout, True, {"sumsq": nrm * nrm, "max_abs": max(-mn.item(), mx.item())}, {}), True
    fin = torch.isfinite(gf)
    gz = torch.where(fin, gf, torch.zeros((), dtype=gf.dtype, device=gf.device)).double()
    vals = {"n": fin.sum(dtype=torch.float64), "sumsq": (gz * gz).sum(),
            "max_abs": gz.abs().amax() if n else gz.new_zeros(()), "n_nan": torch.isnan(gf).sum(dtype=torch.float64),
            "n_inf": torch.isinf(gf).sum(dtype=torch.float64)}  # fmt: skip
    return assemble(layout, False, vals), False
