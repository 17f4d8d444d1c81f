"""Step end of a :class:`~normscope.collect.scope.Scope`: one host transfer, decode, write, flush.

When a sampled step ends (optimizer post-hook or ``scope.step()``), the step's packs (and the
parameter norms, logged scalars and finiteness flags) are concatenated and copied to the host
once, or, under torch.distributed, reduced across ranks by the pack table's merge rules; then
decoded into rows, buffered and flushed as Parquet parts. A mixin of ``Scope``: it reads and
writes the scope's state, so the hook path (``scope.py``) and this path stay apart.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from normscope.collect import distributed as D
from normscope.collect.decode import StepAccumulator, expand_pending
from normscope.collect.meta import _model_device, _now, _to_host
from normscope.collect.params import describe_optimizer, group_hparams
from normscope.store.writer import write_json


class StepEnd:
    # --- step end: one transfer, decode, buffer, flush -------------------------------------------
    def _finish_step(self, updated: bool, params: bool, skipped: bool = False) -> None:
        try:
            self._finish_step_inner(params, skipped)
        except Exception as e:
            self._note_error("step", e)
        finally:
            self._pending = []
            self._scalars = []
            self._signals = []

    def _finish_step_inner(self, params: bool, skipped: bool = False) -> None:
        pending = self._pending
        sq = self._params.take() if params else None  # 3 × P squared norms (of the local shards)
        scal_t = [v for _, _, v in self._scalars if isinstance(v, torch.Tensor)]
        flags = self._sentinels.take() if self._sentinels is not None else []
        # after the packs and norms, in this order: the loss scale, logged scalars, finiteness flags,
        # signals (the writer's own values under torch.distributed: per-rank measurements, not merged)
        chk = self._params.take_check() if params else None  # the optimizer-state algebra's check
        amp = self._amp_tail()
        tail = (
            amp + scal_t + [f[4] for f in flags] + [v for *_, v in self._signals] + ([chk] if chk is not None else [])
        )
        acc = StepAccumulator()
        norms = None
        if self._world > 1:
            write, norms = self._reduce(pending, sq, acc)
            if not write or (not pending and sq is None and not self._scalars and not tail and not skipped):
                if chk is not None:  # a rank that writes nothing reads its own check (check steps only)
                    self._params.checked(float(chk))
                return
            host = _to_host(tail) if tail else np.zeros(0)
            off = 0
        else:
            tensors = [e.pack for e in pending] + ([sq] if sq is not None else []) + tail
            if not tensors and not self._scalars and not skipped:
                return
            host = _to_host(tensors) if tensors else np.zeros(0)
            off = acc.decode(pending, host, columns=True)
            if sq is not None:
                n = len(self._params.entries)
                norms = np.sqrt(host[off : off + 3 * n].reshape(3, n))
                off += 3 * n
        step = self.step_index
        w = self._writer
        scale = float(host[off]) if amp else None
        off += len(amp)
        # the backward ran on the loss times the scale: the output gradients' norm, rms and max |g|
        # divided by it are the true ones (a scale of 0 or NaN: kept as recorded)
        acc.write(w, step, grad_scale=scale if scale is not None and math.isfinite(scale) and scale > 0 else None)
        self._amp_rows(w, step, skipped, scale)
        if norms is not None:
            hp = group_hparams(self._opt)
            if self._opt is not None and "optimizer" not in self._meta:
                self._meta["optimizer"] = describe_optimizer(self._opt)
            self._meta["update_norms"] = self._params.update_source
            for i, (pname, p, layer) in enumerate(self._params.entries):
                lr, wd = hp.get(id(p), (math.nan, math.nan))
                w.append("params", {
                    "step": step, "param": pname, "layer": layer, "numel": p.numel(),
                    "requires_grad": p.requires_grad, "norm": norms[0, i], "grad_norm": norms[1, i],
                    "update_norm": norms[2, i], "lr": lr, "weight_decay": wd,
                })  # fmt: skip
        for phase, name, v in self._scalars:
            if isinstance(v, torch.Tensor):
                v = float(host[off])
                off += 1
            w.append("scalars", {"step": step, "phase": phase, "name": name, "value": float(v)})
        if flags:
            if self._sentinels.record(step, flags, host[off : off + 2 * len(flags)]):
                self._meta["nonfinite_modules"] = self._sentinels.events
            off += 2 * len(flags)
        for phase, layer, call, names, _v in self._signals:
            for k, name in enumerate(names):
                w.append("signals", {"step": step, "phase": phase, "layer": layer, "call": call, "name": name,
                                     "value": float(host[off + k])})  # fmt: skip
            off += len(names)
        if chk is not None:
            self._params.checked(float(host[off]))
            off += 1
            self._meta["update_norms"] = self._params.update_source
        self._steps_recorded += 1
        self._since_flush += 1
        if self._exec_order:  # no root forward seen (submodules called directly)
            self._on_root_post(None, None, None)
        if self._since_flush >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self._flush()

    def _reduce(self, pending: list, sq: torch.Tensor | None, acc: StepAccumulator) -> tuple[bool, Any]:
        """Distributed: every rank's step merged by reductions whose size does not depend on the world
        (:class:`distributed.StepReduction`). Returns (this rank writes the step, 3 × P norms or None)."""
        dev = pending[0].pack.device if pending else sq.device if sq is not None else _model_device(self.model)
        sharded = self._params.sharded() if sq is not None else []
        red, sig = None, D.BAD_SIGNATURE
        try:
            extra = None
            if sharded:  # DTensor shards: Σ over ranks of (local ‖·‖² / replication) = the full ‖·‖²
                wts = self._params.shard_weights_on(self._world, sq.device)
                extra = sq.view(3, -1)[:, sharded] * wts
            red = D.StepReduction.build(pending, extra, self._shifts, dev)
            sig = red.sig
        except Exception as e:  # still enter the check, with a signature that makes every rank skip
            self._note_error("distributed", e)
        if not D.same_entries(sig, red.size if red is not None else -1, dev):
            if red is not None:
                self._note_error("distributed", RuntimeError(
                    "ranks recorded different layers this step (different modules ran, or a hook failed on one rank); "
                    "only rank 0's own statistics are kept for it"))  # fmt: skip
            if self._writer is None or red is None:
                return False, None
            if pending:
                acc.decode(pending, _to_host(expand_pending(pending)), full=True)
            return True, self._param_norms(sq, sharded, None)
        red.run()
        self._shifts.update(red.means)
        if self._writer is None:
            return False, None
        sums, exts = red.host()
        merged = red.decode(sums, exts, acc)
        return True, self._param_norms(sq, sharded, merged)

    def _param_norms(self, sq, sharded: list[int], merged) -> np.ndarray | None:
        """3 × P norms on the writer: its own for replicated parameters (DDP), the merged sums for
        sharded ones (NaN when they could not be merged)."""
        if sq is None:
            return None
        own = _to_host([sq]).reshape(3, -1).copy()
        if sharded:
            own[:, sharded] = merged.reshape(3, len(sharded)) if merged is not None else math.nan
        return np.sqrt(own)

    def _flush(self) -> None:
        if self._writer is None:
            return
        if self._writer.pending_rows:
            self._writer.flush()
        self._since_flush = 0
        self._last_flush = time.monotonic()
        if self._modes is not None:  # the mode audit's counts, with the meta they belong to
            self._meta["modes"] = self._modes.to_json()
        self._meta["steps_recorded"] = self._steps_recorded
        self._meta["last_step"] = self.step_index
        self._meta["heartbeat"] = _now()
        write_json(self.run_dir / "meta.json", self._meta)
