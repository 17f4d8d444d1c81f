"""torch.distributed: combine every rank's packs on rank 0; only rank 0 writes the run.

Each rank reduces its own tensors on device; at the end of a sampled step the packs (all in
the full layout, so shapes alone fix their size) are gathered with one ``all_gather`` after a
tiny ``all_gather`` of (size, signature) that proves every rank recorded the same entries in the
same order. Rank 0 merges them exactly on the host with the same code that merges micro-batches
(sums, counts, histograms add; min/max; per-channel variance by Chan's parallel formula).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def dist_info() -> tuple[int, int, str | None]:
    """(world size, rank, backend); (1, 0, None) outside an initialised process group."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 1, 0, None
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0, None
    return dist.get_world_size(), dist.get_rank(), str(dist.get_backend())


def signature(entries: list[tuple]) -> int:
    """A process-independent checksum of the entries' kinds, keys and pack sizes."""
    return zlib.crc32(repr(entries).encode())


def gather_to_rank0(local: torch.Tensor, sig: int, world: int, rank: int) -> list[np.ndarray] | None | str:
    """Every rank calls this; rank 0 gets each rank's host array, others get None.

    Returns ``"mismatch"`` on every rank when the ranks recorded different entries.
    """
    import torch.distributed as dist

    meta = torch.tensor([float(local.numel()), float(sig)], dtype=torch.float64, device=local.device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    if any(not torch.equal(m, metas[0]) for m in metas):
        return "mismatch"
    bufs = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(bufs, local.contiguous())
    if rank != 0:
        return None
    return [b.cpu().numpy() for b in bufs]
