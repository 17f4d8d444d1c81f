"""Views and buffers the reducers share: the (leading, channels, trailing) view of a tensor for
its channel axis, reusable float32 scratch buffers (no page-faulting allocation per
statistic), and the float32 contiguous copy a reduction reads."""

from __future__ import annotations

import math

import torch


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


def as_f32(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dtype != torch.float32:  # one copy, cast and layout together (a same-dtype .to() would not copy)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
    if not x.is_contiguous():
        x = x.contiguous()
    return x
