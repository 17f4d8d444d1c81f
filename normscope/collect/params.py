"""Per parameter tensor: ‖w‖, ‖∇w‖ and ‖Δw‖ across an optimizer step, reduced on device.

Under FSDP2 (``fully_shard``) parameters and their gradients are DTensors: every ``_foreach``
op runs on the local shards (``to_local()``), and the tracker hands out squared norms, so that
the sharded ones add up across the ranks (:meth:`ParamTracker.shard_weights`) into the norms of
the full parameters, never a shard's.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn

from normscope.collect import native
from normscope.collect.updates import OptimizerUpdate, sq_norms_of, step_sq_norms


def is_dtensor(t) -> bool:
    """A torch.distributed DTensor (checked without importing torch.distributed.tensor)."""
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The rank's own shard of a DTensor; any other tensor as it is."""
    return t.to_local() if t is not None and is_dtensor(t) else t


def shard_weight(p, world: int) -> float:
    """How a DTensor's local squared norm counts in the sum over all ranks: 1 / its replication
    (Replicate mesh dims hold copies; HSDP). NaN when the sum over the world cannot give the full
    norm: a Partial placement, or a mesh that does not span the world."""
    mesh = p.device_mesh
    if mesh.size() != world:
        return math.nan
    rep = 1
    for i, pl in enumerate(p.placements):
        if pl.is_replicate():
            rep *= mesh.size(i)
        elif not pl.is_shard():
            return math.nan
    return 1.0 / rep


class ParamTracker:
    """Computes parameter norms with fused ``_foreach`` kernels; no host sync until the step pack.

    ``before_step`` (optimizer pre-hook) takes ‖∇w‖²; ``after_step`` (post-hook) takes ‖w‖² and
    ‖w_before − w_after‖²; :meth:`take` returns the 3 × P squared norms (of the local shards for
    DTensors). ‖Δw‖ of a torch SGD / Adam / AdamW step is read from the optimizer's state after
    the step (:mod:`normscope.collect.updates`, checked against the weights' change); any other
    update is measured against a copy of w taken in ``before_step``, which lives only while the
    optimizer steps. ``update_source`` says which (meta.json's ``update_norms``).
    """

    def __init__(self, model: nn.Module, track_updates: bool = True, names: dict[str, str] | None = None):
        from normscope.collect.select import canonical_param_name

        self.entries = []  # (canonical name, param, layer)
        for raw, p in model.named_parameters():
            name = canonical_param_name(raw, names) if names else raw
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            self.entries.append((name, p, layer))
        self.track_updates = track_updates
        self._snap: list[torch.Tensor] | None = None
        self._grad_norms: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None  # 3 x P: norm, grad_norm, update_norm
        # no DTensor among the parameters: the fused kernel may take the norms (it checks the rest)
        self._plain = not any(is_dtensor(p) for _, p, _ in self.entries)
        self._reader: OptimizerUpdate | None = None  # reads ‖Δw‖ from the optimizer's state
        self._reader_opt = None
        self._reader_off: str | None = None  # why the state is not read any more (a failed check)
        self._reading = False  # this step's ‖Δw‖ comes from the state: no snapshot taken
        self._check: torch.Tensor | None = None  # a check's disagreeing elements, until the transfer
        self._shard_w: tuple | None = None  # ((weights, device), the weights on the device)
        self.update_source = "weight snapshot" if track_updates else "not measured (track_updates=False)"

    def _nan(self, p: torch.Tensor) -> torch.Tensor:
        return torch.full((), math.nan, dtype=torch.float64, device=local(p).device)

    def sharded(self) -> list[int]:
        """Indices of the entries that are DTensors (their squared norms add across ranks)."""
        return [i for i, (_, p, _) in enumerate(self.entries) if is_dtensor(p)]

    def shard_weights(self, world: int) -> list[float]:
        return [shard_weight(self.entries[i][1], world) for i in self.sharded()]

    def shard_weights_on(self, world: int, device: torch.device) -> torch.Tensor:
        """:meth:`shard_weights` as a float64 tensor on ``device``, copied there once (again only
        when the placements change), not at every sampled step."""
        w = tuple(self.shard_weights(world))
        key = (w, str(device))
        if self._shard_w is None or self._shard_w[0] != key:
            self._shard_w = (key, torch.tensor(w, dtype=torch.float64, device=device))
        return self._shard_w[1]

    def _norms(
        self, tensors: list[torch.Tensor | None], like: list[torch.Tensor], last_first: bool = False
    ) -> torch.Tensor:
        """Squared norms (float64) of the local tensors; NaN where a tensor is missing. CPU float32
        parameters: one call into the fused kernel (it declines any other kind: foreach ops);
        ``last_first``: see :func:`~normscope.collect.updates.sq_norms_of`."""
        if self._plain and tensors and all(t is not None for t in tensors):
            ts = [t.detach() for t in tensors]
            if len({t.device for t in ts}) == 1:
                return sq_norms_of(ts, kernel_ok=True, last_first=last_first)
        tensors = [local(t) for t in tensors]
        present = [t for t in tensors if t is not None]
        norms = torch._foreach_norm([t.detach() for t in present]) if present else []
        dev = local(like[0]).device if like else torch.device("cpu")
        if present and len(present) == len(tensors) and all(n.device == dev for n in norms):
            return torch.stack(norms).double().pow_(2)  # DTensor shards: three ops, not three per tensor
        norms = iter(norms)
        out = [next(norms).double().to(dev) ** 2 if t is not None else self._nan(like[0]) for t in tensors]
        return torch.stack(out) if out else torch.empty(0, device=dev)

    @property
    def has_snapshot(self) -> bool:
        return self._snap is not None

    def snapshot(self) -> None:
        """Copy the trainable weights now (a manual update loop: before its first forward)."""
        self._take_snapshot([p for _, p, _ in self.entries])

    def _reader_for(self, optimizer) -> OptimizerUpdate | None:
        if optimizer is None or self._reader_off is not None or not self.track_updates:
            return None
        if self._reader_opt is not optimizer:
            self._reader_opt, self._reader = optimizer, OptimizerUpdate.of(optimizer)
        return self._reader

    def before_step(self, optimizer=None, closure: bool = False) -> None:
        """``optimizer``: the one about to step (its state may give ‖Δw‖ without a copy);
        ``closure``: its step was given a closure.

        ‖∇w‖ is taken here, before the step, unless the step is read from the optimizer's state
        on the CPU kernel and leaves the gradients alone (:meth:`OptimizerUpdate.keeps_grads`):
        then :meth:`after_step` reads them in the same pass as the weights and the state (one
        read of every tensor instead of three passes: measured 15 % less time on the MLP's
        66 MB). On a check step they are taken here, and the check confirms that they did not
        change."""
        params = [p for _, p, _ in self.entries]
        if not params:
            return
        reader = self._reader_for(optimizer)
        why = reader.unreadable(params, closure) if reader is not None else None
        self._reading = reader is not None and why is None
        due = self._reading and reader.due()
        later = self._reading and not due and self._plain and native.KERNEL is not None and reader.keeps_grads()
        self._grad_norms = None if later else self._norms([p.grad for p in params], params)
        if self._reading:
            self._snap = None  # (a copy from the first forward of a manual loop: not needed)
            self.update_source = f"{reader.name} state"
            if due:
                reader.probe([local(p.detach()) for p in params], [local(p.grad) for p in params])
            return
        if self._reader_off is None and self.track_updates:
            self.update_source = f"weight snapshot ({reader.name}: {why})" if why else "weight snapshot"
        self._take_snapshot(params)

    def _take_snapshot(self, params) -> None:
        if self.track_updates and params:
            # Allocated here and freed in after_step: during the optimizer step the activations
            # are already freed, so the copy reuses their memory instead of raising peak memory
            # (on CPU a fresh allocation page-faults, ~2 ms per 4 MB: measured in the benchmark).
            trainable = [local(p.detach()) for p in params if p.requires_grad]
            self._snap = None  # (never two copies at once)
            self._snap = [torch.empty_like(p) for p in trainable]
            if trainable:
                torch._foreach_copy_(self._snap, trainable)

    def after_step(self, updated: bool) -> None:
        """Record the step's norms; ``updated`` says whether an optimizer step ran in between.
        The gradients' norms not taken before the step (see :meth:`before_step`; a manual loop
        has no before) are taken now, in the weights' pass where the kernel can."""
        params = [p for _, p, _ in self.entries]
        if not params:
            return
        grads = [local(p.grad) for p in params] if self._grad_norms is None else None
        if updated and self._reading:
            w, g, du = self._read_updates(params, grads)
        elif updated and self.track_updates and self._snap is not None:
            w, g, du = self._update_norms(params, grads)
        else:
            w, g, du = self._norms([p.detach() for p in params], params, last_first=updated), None, None
        if grads is not None:
            self._grad_norms = g if g is not None else self._norms([p.grad for p in params], params)
        if du is None:
            du = torch.full_like(w, math.nan)
        self._pending = torch.stack([w, self._grad_norms, du]).double().view(-1)
        self._grad_norms = None
        self._snap = None
        self._reading = False

    def _read_updates(self, params, grads) -> tuple:
        """(‖w‖², ‖∇w‖² of ``grads`` or None, ‖Δw‖² from the optimizer's state). On a check step, ‖Δw‖²
        is NaN where the check failed (decided on the device; :meth:`checked` reads the verdict
        with the step's transfer)."""
        reader = self._reader
        weights = [local(p.detach()) for p in params]
        terms = reader.terms(params)
        if reader.probed and grads is None:  # (a check step: its gradients, to compare with the probe)
            grads_now = [local(p.grad) for p in params]
        else:
            grads_now = grads
        nbad = reader.check(terms, weights, grads_now)
        w, g, du = reader.norms_after(params, terms, weights, grads, self._grad_norms, kernel_ok=self._plain)
        reader.updates += 1
        if nbad is not None:
            du = torch.where(nbad.to(du.device) > 0, torch.full_like(du, math.nan), du)
            self._check = nbad
        return w, g, du

    def take_check(self) -> torch.Tensor | None:
        """This step's check of the optimizer-state algebra (disagreeing elements), if one ran."""
        c, self._check = self._check, None
        return c

    def checked(self, disagreeing: float) -> None:
        """The check's verdict, read on the host: a disagreement hands the rest of the run to the
        weight snapshot (that step's ‖Δw‖ is already NaN)."""
        reader = self._reader
        if reader is None:
            return
        if disagreeing > 0 and self._reader_off is None:
            why = reader.explain()
            self._reader_off = self.update_source = (
                f"weight snapshot (the {reader.name} state disagreed with the weights' change: {why})"
            )
            warnings.warn(f"normscope: ‖Δw‖ could not be read from the {reader.name} optimizer's state ({why}); "
                          "measuring it against a weight copy from the next step on", RuntimeWarning, stacklevel=2)  # fmt: skip
        reader.forget()

    def _update_norms(self, params, grads) -> tuple:
        """(‖w‖², ‖∇w‖² of ``grads`` or None, ‖w_before − w_after‖²) per parameter (0 for frozen
        ones) from the snapshot: CPU float32 parameters in one pass over each parameter's weights,
        copy and gradient through the fused kernel, else foreach ops in the snapshot."""
        weights = [local(p.detach()) for p in params]
        trainable = [w_ for w_, p in zip(weights, params) if p.requires_grad]
        if self._plain and len(trainable) == len(self._snap):
            snap = iter(self._snap)
            terms = [(2, next(snap), None, 0.0, 0.0, 1.0, 0.0, 0.0) if p.requires_grad else None for p in params]
            out = step_sq_norms(weights, grads, terms)
            if out is not None:
                w, g, du = out.unbind(0)
                return w, (g if grads is not None else None), du
        w = self._norms(weights, params, last_first=True)
        torch._foreach_sub_(self._snap, trainable)  # snap := w_before - w_after (measured faster than torch.dist)
        norms = torch._foreach_norm(self._snap)
        if len(norms) == len(params) and all(n.device == w.device for n in norms):
            return w, None, torch.stack(norms).double().pow_(2) if norms else w.new_zeros(0)
        upd = iter(norms)
        du = [next(upd).double().to(w.device) ** 2 if p.requires_grad else w.new_zeros(()) for p in params]
        return w, None, torch.stack(du)

    def take(self) -> torch.Tensor | None:
        p, self._pending = self._pending, None
        self._grad_norms = None
        return p

    def release(self) -> None:
        self._snap = None
        self._reading = False
        self._check = None
        self._pending = None
        self._grad_norms = None


def group_hparams(optimizer) -> dict[int, tuple[float, float]]:
    """id(param) → (lr, weight_decay) from an optimizer's param groups (host values only)."""
    out: dict[int, tuple[float, float]] = {}
    if optimizer is None:
        return out
    for g in optimizer.param_groups:
        lr, wd = g.get("lr", math.nan), g.get("weight_decay", 0.0)
        lr = float(lr) if not isinstance(lr, torch.Tensor) or lr.device.type == "cpu" else math.nan
        wd = float(wd) if not isinstance(wd, torch.Tensor) or wd.device.type == "cpu" else math.nan
        for p in g["params"]:
            out[id(p)] = (lr, wd)
    return out


def describe_optimizer(optimizer) -> dict:
    """Type and the hyperparameters that set the healthy update size (meta.json's ``optimizer``)."""
    g = optimizer.param_groups[0] if optimizer.param_groups else {}

    def plain(v):
        if isinstance(v, torch.Tensor):
            return float(v) if v.numel() == 1 and v.device.type == "cpu" else None
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v if isinstance(v, (int, float, bool)) or v is None else str(v)

    out = {"type": type(optimizer).__name__, "groups": len(optimizer.param_groups)}
    for k in ("lr", "momentum", "nesterov", "betas", "weight_decay", "eps"):
        if k in g:
            out[k] = plain(g[k])
    return out
