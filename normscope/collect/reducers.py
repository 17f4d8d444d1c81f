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
from dataclasses import replace
from functools import lru_cache

import torch

from normscope.collect import native as _native
from normscope.collect.bins import (
    LINEAR_BINS,
    SIGMOID_HI,
    SIGMOID_LO,
    SYMLOG_BINS,
    SYMLOG_HI_EXP,
    SYMLOG_K,
    SYMLOG_LO_EXP,
    TANH_T,
    HistSpec,
    SatSpec,
    hist_stride,
    histogram,
    linear_edges,
    sat_ops,
    sat_region,
    symlog_edges,
)
from normscope.collect.packs import ActLayout, GradLayout, _ordered, assemble, assemble_host, preset_fields
from normscope.collect.reducers_fast import WIDE, reduce_act_fast, reduce_act_fast_wide, reduce_act_minimal_fast
from normscope.collect.views import Scratch, as_f32, channel_view_shape

# the entry points, and the vocabulary their callers use (bins, specs and buffers live in bins/views)
__all__ = [
    "ActLayout",
    "GradLayout",
    "HistSpec",
    "SatSpec",
    "Scratch",
    "act_layout",
    "reduce_act",
    "reduce_grad",
    "LINEAR_BINS",
    "SYMLOG_BINS",
    "SYMLOG_HI_EXP",
    "SYMLOG_K",
    "SYMLOG_LO_EXP",
    "TANH_T",
    "SIGMOID_LO",
    "SIGMOID_HI",
    "hist_stride",
    "linear_edges",
    "symlog_edges",
    "channel_view_shape",
]


# The pack layout (fields, order, merge rules, what the fast path leaves out) is declared once,
# in normscope.collect.packs; the reducers fill its fields by name.
FORCE_MASKED = False  # tests: exercise the NaN-safe (accelerator) path on the CPU


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
    fused: bool = True,
) -> tuple[torch.Tensor, bool]:
    """All forward statistics of one output tensor: ``(pack, fast)``.

    The pack is 1-D of ``layout.pack_size(fast)`` elements; ``fast`` is a host bool (the CPU
    path for all-finite tensors), so decoding never waits on the device. On the CPU the fused
    kernel (:mod:`normscope.collect.native`) computes the fast pack in one call when it is
    loaded (``fused=False``: the torch ops, the reference it is tested against).
    """
    if force_masked is None:
        force_masked = FORCE_MASKED
    xf = as_f32(x)
    if not layout.per_channel:  # one channel: (samples, 1, rest), the pack's own layout unchanged
        a, c, s = channel_view_shape(xf.shape, layout.axis)
        xf, layout = xf.reshape(a, 1, c * s), replace(layout, axis=1, per_channel=True)
    kernel = _native.KERNEL if fused else None
    if kernel is not None and xf.device.type == "cpu" and not force_masked and _kernel_writes(layout.stats):
        a, c, s = channel_view_shape(xf.shape, layout.axis)
        standard = layout.stats != "minimal"
        kind, lo, hi = _hist_args(hist)
        pack = kernel.act_pack(xf, a, c, s, standard, kind, layout.hist_bins if standard else 0, lo, hi,
                               hist_stride(xf.numel(), hist_max), *_sat_args(sat), SYMLOG_LO_EXP, SYMLOG_K)  # fmt: skip
        if pack.numel():
            return pack, True
        return _reduce_act_masked(xf, layout, hist, sat, hist_max), False  # NaN or Inf in it
    if _autocast_on(xf.device.type):  # hooks run inside the user's autocast: keep float32
        with torch.autocast(xf.device.type, enabled=False):
            return reduce_act(xf, layout, hist, sat, hist_max, scratch, force_masked)
    if xf.device.type == "cpu" and not force_masked:
        mn, mx = torch.aminmax(xf)
        lo = mn.item()  # CPU: reading a value is not a device sync
        if math.isfinite(lo) and math.isfinite(mx.item()):
            if layout.stats == "minimal":
                return reduce_act_minimal_fast(xf, layout, lo, mx.item(), scratch), True
            if xf.numel() >= WIDE:
                return reduce_act_fast_wide(xf, layout, hist, sat, hist_max, scratch, mn, mx, lo >= 0), True
            return reduce_act_fast(xf, layout, hist, sat, hist_max, scratch, lo, mx.item()), True
    return _reduce_act_masked(xf, layout, hist, sat, hist_max), False


# The fast-pack fields the fused kernel writes (fused.cpp, act_pack), in order, per preset family.
KERNEL_FIELDS = {
    "standard": ("min", "max", "abs_sum", "n_zero", "n_nonpos", "n_sat", "s1", "m2", "active", "hist"),
    "minimal": ("min", "max", "s1", "m2"),
}


@lru_cache(maxsize=8)
def _kernel_writes(stats: str) -> bool:
    """Whether the kernel's pack is this preset's fast pack: a field added to the pack table and
    not yet to the kernel sends the tensors to the torch path instead of into a wrong layout."""
    want = tuple(f.name for f in _ordered(preset_fields(stats), True))
    return want == KERNEL_FIELDS["minimal" if stats == "minimal" else "standard"]


@lru_cache(maxsize=64)
def _hist_args(hist: HistSpec) -> tuple[int, float, float]:
    """The kernel's histogram arguments: kind (1 symlog, 2 linear) and the linear range."""
    return (1, 0.0, 0.0) if hist.kind == "symlog" else (2, float(hist.lo), float(hist.hi))


@lru_cache(maxsize=64)
def _sat_args(sat: SatSpec | None) -> tuple[int, float, float]:
    """The kernel's saturation arguments, from :func:`bins.sat_region`: kind (0 none, 1 outside
    the open interval, 3 at or past the bounds) and the thresholds."""
    if sat is None:
        return 0, 0.0, 0.0
    lo, hi, incl = sat_region(sat)
    return (3 if incl else 1), lo, hi


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4: no per-device query
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


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
    inf = torch.full((), math.inf, dtype=xf.dtype, device=xf.device)  # a fill, not a host copy
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
    h, hn = histogram(xf, hist, hist_max, fin)
    vals = {"n": n_fin, "min": mn, "max": mx, "abs_sum": abs_sum, "n_zero": n_zero, "n_nonpos": n_nonpos,
            "n_sat": n_sat, "n_nan": n_nan, "n_inf": n_inf, "hist_n": hn,
            "samples": torch.full((), float(a), dtype=torch.float64, device=xf.device),
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
    inf = torch.full((), math.inf, dtype=xf.dtype, device=xf.device)  # a fill, not a host copy
    n_nan = torch.isnan(flat).sum(dtype=torch.float64)
    vals = {"n": cnt, "min": torch.where(fin, flat, inf).amin(), "max": torch.where(fin, flat, -inf).amax(),
            "n_nan": n_nan, "n_inf": flat.numel() - cnt - n_nan,
            "samples": torch.full((), float(a), dtype=torch.float64, device=xf.device),
            "cnt": cnt.view(1), "s1": s1.view(1), "m2": (d * d).sum().view(1)}  # fmt: skip
    return assemble(layout, False, vals)


def _sat_mask(x: torch.Tensor, sat: SatSpec) -> torch.Tensor:
    lo, hi, incl = sat_region(sat)
    lo_op, hi_op = sat_ops(incl)
    return lo_op(x, lo) | hi_op(x, hi)


def reduce_grad(g: torch.Tensor, force_masked: bool | None = None, fused: bool = True) -> tuple[torch.Tensor, bool]:
    """Gradient statistics ``(pack, fast)`` in the layout of ``packs.GRAD_FIELDS``.

    Fast (CPU, finite): sum of squares and max |g| only; else also the finite, NaN and Inf
    counts. Always float64.
    """
    if force_masked is None:
        force_masked = FORCE_MASKED
    gf = as_f32(g)
    n = gf.numel()
    layout = GradLayout(n)
    kernel = _native.KERNEL if fused else None
    if kernel is not None and gf.device.type == "cpu" and not force_masked:
        pack = kernel.grad_pack(gf)
        if pack.numel():
            return pack, True
    elif gf.device.type == "cpu" and not force_masked:  # host floats and one small tensor: three ops
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
