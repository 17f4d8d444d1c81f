"""torch.distributed: reduce every rank's packs with collectives whose size does not grow with the world.

Each rank reduces its own tensors on device. At the end of a sampled step a rank merges its packs
of the same entry (micro-batches) and lays the step out by the pack table's merge rules
(:mod:`normscope.collect.packs`):

- one tiny MAX ``all_reduce`` of (signature, size) proves that every rank recorded the same
  entries in the same order with the same layouts (a rank whose preparation failed enters it with
  an impossible signature, so every rank skips the step together);
- one SUM ``all_reduce``: sums, counts, histograms, activity, each ``chan`` field as Σ(x−K)²
  about a per-channel shift K that every rank holds (the previous sampled step's merged channel
  mean, which every rank got from the same reduction; 0 the first time), the local forward counts,
  and any extra sums (the squared norms of sharded parameters);
- one MAX ``all_reduce``: maxima, minima negated, and a flag: when N·(M−K)² is so large against
  the merged m2 that float64 would lose more than 7 digits, a second SUM of the ``chan`` fields
  about the global mean M follows (rare: a channel whose mean moved far since the last sample).

Every buffer's size is fixed by the layouts: bytes per rank per sampled step are the same at 2
ranks or 1,024 (:func:`step_bytes` sizes them). All ranks get the merged values; only rank 0
copies them to the host and writes the run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from normscope.collect import packs as P

CANCEL_RATIO = 1e7  # N·(M−K)² / m2 above this: redo m2 about the global mean
BAD_SIGNATURE = -1.0  # a crc32 is ≥ 0: a rank that could not prepare its step sends this


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


@dataclass
class Group:
    """One entry of the step (kind, key) and its local packs, merged into the buffers."""

    kind: str
    key: tuple
    layout: object
    module_type: str
    forwards: int
    stacked: torch.Tensor  # k × full size: this rank's packs of the entry
    shift: torch.Tensor | None  # K of the chan fields (act entries)
    sum_at: int = 0
    ext_at: int = 0


@dataclass
class StepReduction:
    """One rank's SUM and MAX buffers for a sampled step, and the collectives over them."""

    groups: list[Group]
    sum_buf: torch.Tensor
    ext_buf: torch.Tensor  # [cancellation flag] + extrema
    extra_at: int  # where the extra sums start in sum_buf
    extra_n: int
    sig: int
    means: dict = field(default_factory=dict)  # (kind, key) → merged channel mean (device), after run()

    @classmethod
    def build(cls, pending: list, extra: torch.Tensor | None, shifts: dict, device) -> StepReduction:
        by_key: dict[tuple, list] = {}
        for e in pending:
            by_key.setdefault((e.kind, e.key), []).append(e)
        groups, sums, exts = [], [], [torch.zeros(1, dtype=torch.float64, device=device)]
        o, x = 0, 1
        for (kind, key), es in by_key.items():
            lay = es[0].layout
            if any(_shape(e.layout) != _shape(lay) for e in es):
                raise ValueError(f"{key[1]}: the channel count changed between forwards of one step")
            st = torch.stack([P.expand(e.pack, e.layout, e.fast).to(device) for e in es])
            shift = None
            if kind == "act":
                k = shifts.get((kind, key))
                shift = k if k is not None and k.numel() == lay.channels else None
            g = Group(kind, key, lay, es[0].module_type, len(es), st, shift, o, x)
            s = P.sum_part(st, lay, shift)
            if kind == "act":
                s = torch.cat([s, s.new_full((1,), float(len(es)))])
            sums.append(s)
            exts.append(P.ext_part(st, lay))
            o += s.numel()
            x += exts[-1].numel()
            groups.append(g)
        extra_n = 0
        if extra is not None:
            sums.append(extra.to(device=device, dtype=torch.float64).reshape(-1))
            extra_n = sums[-1].numel()
        sum_buf = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)
        ext_buf = torch.cat(exts)
        sig = signature([(g.kind, g.key, _shape(g.layout)) for g in groups] + [("extra", extra_n)])
        return cls(groups, sum_buf, ext_buf, o, extra_n, sig)

    @property
    def size(self) -> int:
        return self.sum_buf.numel() + self.ext_buf.numel()

    def _fields(self, g: Group) -> dict:
        n = P.sum_width(g.layout)
        return P.reduced_fields(self.sum_buf[g.sum_at : g.sum_at + n], self.ext_buf[g.ext_at :], g.layout)

    def run(self) -> None:
        """The collectives (every rank, same order); afterwards the buffers hold merged raw fields."""
        import torch.distributed as dist

        if not self.groups and not self.extra_n:  # nothing recorded on any rank (sizes agreed)
            return
        dist.all_reduce(self.sum_buf, op=dist.ReduceOp.SUM)
        acts = [g for g in self.groups if g.kind == "act"]
        ratios = []
        for g in acts:
            r = self._fields(g)
            mean = P.global_mean(r, torch)
            self.means[(g.kind, g.key)] = mean.clone()
            for f in g.layout.fields:
                if f.merge == "chan":
                    _, ratio = P.m2_about_mean(r[f.name], r, g.shift, torch)
                    ratios.append(ratio.max() if ratio.numel() else ratio.new_zeros(()))
        if ratios:  # this rank's view of the cancellation: the MAX below makes the decision common
            self.ext_buf[0] = (torch.stack(ratios).max() > CANCEL_RATIO).double()
        dist.all_reduce(self.ext_buf, op=dist.ReduceOp.MAX)
        if acts and float(self.ext_buf[0]) > 0:
            again = torch.cat([P.chan_part(g.stacked, g.layout, self.means[(g.kind, g.key)]) for g in acts])
            dist.all_reduce(again, op=dist.ReduceOp.SUM)
            o = 0
            for g in acts:
                r = self._fields(g)
                for f in g.layout.fields:
                    if f.merge == "chan":
                        w = g.layout.width(f)
                        r[f.name].copy_(again[o : o + w])
                        o += w
                g.shift = self.means[(g.kind, g.key)]
        for g in acts:  # m2 about the global mean, in place (the buffers are ours)
            r = self._fields(g)
            for f in g.layout.fields:
                if f.merge == "chan":
                    r[f.name].copy_(P.m2_about_mean(r[f.name], r, g.shift, torch)[0])

    def host(self) -> tuple[np.ndarray, np.ndarray]:
        both = torch.cat([self.sum_buf, self.ext_buf]).cpu().numpy()
        return both[: self.sum_buf.numel()], both[self.sum_buf.numel() :]

    def decode(self, sums: np.ndarray, exts: np.ndarray, acc) -> np.ndarray | None:
        """Merged raw fields into ``acc`` (a StepAccumulator); returns the merged extra sums."""
        for g in self.groups:
            n = P.sum_width(g.layout)
            raw = P.reduced_fields(sums[g.sum_at : g.sum_at + n], exts[g.ext_at :], g.layout)
            if g.kind == "act":
                acc.add_merged(g.key, raw, g.module_type, g.layout, int(sums[g.sum_at + n]))
            else:
                acc.add_grad(g.key, raw)
        return sums[self.extra_at : self.extra_at + self.extra_n] if self.extra_n else None


def _shape(layout) -> tuple:
    """What fixes an entry's buffer layout (not the batch size, which may differ between ranks)."""
    if isinstance(layout, P.GradLayout):
        return ("grad",)
    return (layout.channels, layout.hist_bins, layout.per_channel, layout.stats)


def same_entries(sig: float, size: int, device) -> bool:
    """The cheap check, on every rank: did all ranks build the same step (MAX of ±values)?"""
    import torch.distributed as dist

    meta = torch.tensor([float(sig), -float(sig), float(size), -float(size)], dtype=torch.float64, device=device)
    dist.all_reduce(meta, op=dist.ReduceOp.MAX)
    m = meta.tolist()
    return m[0] == -m[1] and m[2] == -m[3] and m[0] != BAD_SIGNATURE


# --- sizing: bytes per rank per sampled step, from the pack table --------------------------------


def entry_values(kind: str, channels: int = 1, hist_bins: int = 0, max_channels: int | None = None) -> int:
    """float64 values one entry puts in the step's collectives (SUM + MAX buffers)."""
    if kind == "grad":
        lay = P.GradLayout(1)
        return P.sum_width(lay) + P.ext_width(lay)
    per = max_channels is None or channels <= max_channels
    lay = P.ActLayout(numel=1, channels=channels if per else 1, samples=1, axis=-1, hist_bins=hist_bins,
                      per_channel=per)  # fmt: skip
    return P.sum_width(lay) + 1 + P.ext_width(lay)  # + the forward count


def step_bytes(entries: list[tuple], n_params: int = 0, max_channels: int | None = None) -> int:
    """Bytes each rank hands to normscope's collectives in one sampled step (first pass), whatever
    the world size. ``entries``: (kind, channels, hist_bins) per recorded entry ("act" or "grad");
    ``n_params``: parameter tensors whose squared norms are reduced (sharded ones; 0 under DDP)."""
    vals = 4 + 1 + 3 * n_params  # the signature check, the cancellation flag, ‖w‖², ‖∇w‖², ‖Δw‖²
    for kind, c, h in entries:
        vals += entry_values(kind, c, h, max_channels)
    return 8 * vals
