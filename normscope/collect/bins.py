"""What the histogram and the saturation count count, and how: the fixed bin edges (symlog
octaves, or linear between an activation's bounds), the saturation regions of CHECKS.md, the
deterministic subsample stride, and the two counting primitives every reduction path shares.

Pure functions of tensors and specs; the pack layout that stores the counts lives in
:mod:`normscope.collect.packs`, the reductions in :mod:`normscope.collect.reducers`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# --- histogram bins ------------------------------------------------------------------------
# "symlog": one bin per octave of |x| from 2**-20 (~1e-6) to 2**14 (16384) on each sign, a
# central bin for |x| < 2**-20 (zeros, subnormals) and an overflow bin on each side (±Inf land
# there). Power-of-two edges are read straight from the float's exponent bits: exact and cheap.
# Fixed for every layer and step, so histograms compare across layers and over time.
SYMLOG_LO_EXP = -20
SYMLOG_HI_EXP = 14
SYMLOG_K = SYMLOG_HI_EXP - SYMLOG_LO_EXP  # 34 octave bins per side
SYMLOG_BINS = 2 * (SYMLOG_K + 1) + 1  # 71
LINEAR_BINS = 64

# Saturation kinds (CHECKS.md): sigmoid y < 0.01 or y > 0.99; tanh |y| > 0.97; hardtanh-family
# at its bounds (y <= lo or y >= hi).
SIGMOID_LO, SIGMOID_HI = 0.01, 0.99
TANH_T = 0.97


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


def hist_index(y: torch.Tensor, spec: HistSpec) -> torch.Tensor:
    """Bin index (int32) of every element of the 1-D float32 tensor y (±Inf: outer bins)."""
    if spec.kind == "symlog":
        bits = y.view(torch.int32)
        k = (bits >> 23).bitwise_and_(0xFF).sub_(127 + SYMLOG_LO_EXP - 1).clamp_(0, SYMLOG_K + 1)
        neg = bits >> 31  # -1 for a set sign bit, else 0: (k ^ neg) - neg == ±k without a branch
        return k.bitwise_xor_(neg).sub_(neg).add_(SYMLOG_K + 1)
    idx = (y - spec.lo).mul_(LINEAR_BINS / (spec.hi - spec.lo)).floor_().clamp_(0, LINEAR_BINS - 1)
    return idx.to(torch.int32)


def histogram(x: torch.Tensor, spec: HistSpec, hist_max: int, finite: torch.Tensor | None):
    flat = x.view(-1)
    stride = hist_stride(flat.numel(), hist_max)
    y = flat[::stride].contiguous() if stride > 1 else flat
    if finite is None:
        h = torch.bincount(hist_index(y, spec), minlength=spec.bins)
        return h, y.new_full((), float(y.numel()))
    fs = finite.view(-1)[::stride] if stride > 1 else finite.view(-1)
    w = fs.to(torch.float32)
    yz = torch.where(fs, y, torch.zeros_like(y))
    h = torch.bincount(hist_index(yz, spec), weights=w, minlength=spec.bins).to(torch.float32)
    return h, w.sum()


def sat_region(sat: SatSpec) -> tuple[float, float, bool]:
    """The saturation region of CHECKS.md, the one definition every reduction path reads (the
    masked and fast torch paths and the fused kernel's arguments): ``(lo, hi, inclusive)``,
    saturated where y < lo or y > hi, or y <= lo or y >= hi when ``inclusive`` (bounds kinds)."""
    if sat.kind == "sigmoid":
        return SIGMOID_LO, SIGMOID_HI, False
    if sat.kind == "tanh":
        return -TANH_T, TANH_T, False
    return float(sat.lo), float(sat.hi), True


def sat_ops(inclusive: bool):
    """The (below, above) comparisons of a region: ``le``/``ge`` when inclusive, else ``lt``/``gt``."""
    return (torch.le, torch.ge) if inclusive else (torch.lt, torch.gt)


def sat_count(x: torch.Tensor, sat: SatSpec | None, buf: torch.Tensor | None) -> torch.Tensor:
    if sat is None:
        return x.new_zeros(())
    lo, hi, incl = sat_region(sat)
    lo_op, hi_op = sat_ops(incl)
    if buf is None:  # masked path: x has non-finite entries already replaced, mask applied by caller
        return lo_op(x, lo).sum() + hi_op(x, hi).sum()
    buf = buf.view(x.shape)
    c = lo_op(x, lo, out=buf).sum()
    return c + hi_op(x, hi, out=buf).sum()
