"""``normscope.watch(model)`` → :class:`Scope`: hooks that record per-layer statistics.

Per sampled step, each hooked module call reduces its output(s) on device into a small packed
tensor (normscope.collect.reducers); gradients w.r.t. those outputs are reduced by a tensor hook
registered in the forward hook (never ``register_full_backward_hook``). When the step ends
(optimizer step post-hook or ``scope.step()``) the packs are concatenated and copied to the host
once, decoded, and buffered as rows; every ``flush_every`` sampled steps (or ``flush_seconds``)
they are written as Parquet parts. Memory is O(layers): no activation is kept.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normscope.collect import amp as A
from normscope.collect import compiled as C
from normscope.collect import distributed as D
from normscope.collect import native
from normscope.collect import reducers as R
from normscope.collect.attention import register as transformer_probes
from normscope.collect.decode import PendingEntry
from normscope.collect.meta import _now, _sel_json, initial_meta
from normscope.collect.modes import ModeAudit
from normscope.collect.packs import PRESETS
from normscope.collect.params import ParamTracker
from normscope.collect.scope_compiled import CompiledRuntime
from normscope.collect.scope_hooks import CachedReduction, ForwardHooks
from normscope.collect.scope_step import StepEnd
from normscope.collect.select import HookPlan, Selector, canonical_names, plan_hooks
from normscope.collect.sentinel import FiniteSentinels
from normscope.collect.step_hooks import StepHooks
from normscope.errors import NormscopeError
from normscope.roles import type_name
from normscope.store.writer import RunWriter, write_json

DEFAULT_EVERY = 20


class Scope(ForwardHooks, CompiledRuntime, StepEnd, A.LossScaling):
    """Collects statistics while ``model`` trains. Use as a context manager (see :func:`watch`)."""

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike | None = None,
        every: int = DEFAULT_EVERY,
        include: Iterable[Selector] | Selector | None = None,
        exclude: Iterable[Selector] | Selector | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        flush_every: int = 50,
        flush_seconds: float = 30.0,
        hist_max: int | None = None,
        channel_axis: dict[str, int] | None = None,
        track_updates: bool = True,
        grads: bool = True,
        name: str | None = None,
        roles: dict | None = None,
        max_channels: int | None = None,
        grad_every: int = 1,
        finite_flags: bool = True,
        stats: str = "standard",
    ):
        if not isinstance(model, nn.Module):
            raise NormscopeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}.")
        for label, v in (("every", every), ("flush_every", flush_every), ("grad_every", grad_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NormscopeError(f"{label} must be a whole number ≥ 1, got {v!r}.")
        if stats not in PRESETS:
            raise NormscopeError(f"stats must be one of {', '.join(repr(p) for p in PRESETS)}, got {stats!r}.")
        self.stats = stats
        if hist_max is None:  # "full": the histogram over every element; else a bounded subsample
            hist_max = 0 if stats == "full" else 16384
        if isinstance(hist_max, bool) or not isinstance(hist_max, int) or hist_max < 0:
            raise NormscopeError(f"hist_max must be a whole number ≥ 0 (0 = every element), got {hist_max!r}.")
        if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(max_channels, int)
                                         or max_channels < 1):  # fmt: skip
            raise NormscopeError(
                f"max_channels must be a whole number ≥ 1 (or None: every channel), got {max_channels!r}."
            )
        self.max_channels = max_channels
        self.grad_every = grad_every
        self.model = model
        self.every = every
        self.flush_every = flush_every
        self.flush_seconds = float(flush_seconds)
        self.hist_max = hist_max
        self.track_updates = track_updates
        self.record_grads = grads
        self.name = name or type_name(model)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"{self.name}-{stamp}"
        self._plans: list[HookPlan] = plan_hooks(model, include, exclude, channel_axis, roles)
        self._options = {
            "every": every, "include": _sel_json(include), "exclude": _sel_json(exclude),
            "flush_every": flush_every, "flush_seconds": flush_seconds, "hist_max": hist_max,
            "channel_axis": dict(channel_axis or {}), "track_updates": track_updates, "grads": grads,
            "finite_flags": finite_flags,
            "roles": {(k if isinstance(k, str) else _sel_json(k)[0]): v for k, v in (roles or {}).items()},
            "max_channels": max_channels, "grad_every": grad_every, "stats": stats,
        }  # fmt: skip
        optimizer = _unwrap_optimizer(optimizer)
        self._explicit_opt = optimizer
        self._opt = optimizer
        self._handles: list[Any] = []  # root and optimizer hooks: every step
        self._step_hooks = StepHooks()  # the modules' hooks: sampled steps only (step_hooks.py)
        self._hook_guards = False  # dynamo guards on module hooks (set once dynamo is in the process)
        self._active = False
        self.step_index = 0
        self._sampling = True
        self._pending: list[PendingEntry] = []
        self._scalars: list[tuple[str, str, Any]] = []
        self._signals: list[tuple[str, str, int, tuple[str, ...], torch.Tensor]] = []  # see emit()
        self._calls: dict[str, int] = defaultdict(int)
        self._recent: dict[int, CachedReduction] = {}
        self._axes: dict[int, tuple] = {}  # id(tensor) → (ref, axis, shape) of outputs reduced in this forward
        # (layer, call, output) → the axis it inherited through a view in a forward with autograd: an
        # inference-mode view has no _base, so eval under torch.inference_mode() reads the same axis
        self._inherited_axes: dict[tuple, int] = {}
        self._root_phase: str | None = None  # the phase of the root forward running now
        self._await_grad: dict[str, list] = defaultdict(list)  # train calls whose outputs had no grad yet
        self._snapped = False
        self._warned_functorch = False
        self._exec_order: list[dict] | None = []
        self._order_seen: set = set()
        self._disabled: set[str] = set()
        self._hook_errors: list[str] = []
        self._optimizer_steps = 0
        self._manual_steps = 0  # scope.step() calls that advanced (a manual update loop)
        self._forward_since_advance = False
        self._warned_manual = False
        self._scratch = R.Scratch()
        self._params = ParamTracker(model, track_updates=track_updates, names=canonical_names(model))
        self._sentinels = (
            FiniteSentinels(model, {p.name for p in self._plans}, canonical_names(model)) if finite_flags else None
        )
        self._param_pre_done = False
        self._steps_recorded = 0
        self._last_flush = time.monotonic()
        self._since_flush = 0
        self._writer: RunWriter | None = None
        self._meta: dict = {}
        self._world, self._rank = 1, 0
        self._shifts: dict = {}  # (kind, key) → last merged channel mean: the shift of the next reduction
        self._sid = 0  # this scope's id in compiled graphs (normscope.collect.compiled)
        self._grad_slots: list[tuple] = []  # compiled calls of this step awaiting their gradients
        self._warned_unhooked = False
        self._modes: ModeAudit | None = None  # train/eval mode audit (normscope.collect.modes)

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Scope:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "complete" if exc_type is None else f"failed: {exc_type.__name__}: {exc}"
        self.close(status=status)

    def start(self) -> Scope:
        if self._active:
            return self
        self._world, self._rank, backend = D.dist_info()
        if [id(p) for p in self.model.parameters()] != [id(p) for _, p, _ in self._params.entries]:
            # parameters replaced since watch() (fully_shard applied in between): track the new ones
            self._params = ParamTracker(self.model, track_updates=self.track_updates, names=canonical_names(self.model))
        on_cpu = next(self.model.parameters(), torch.empty(0)).device.type == "cpu"
        if on_cpu:  # the fused CPU reduction: loaded if built, else built in the background for later runs
            native.load()
        if self._rank == 0:  # under torch.distributed only rank 0 writes the run directory
            if (self.run_dir / "meta.json").exists():
                raise NormscopeError(
                    f"{self.run_dir} already holds a normscope run: pass a new run_dir (runs are never overwritten)."
                )
            self._writer = RunWriter(self.run_dir)
            self._meta = self._initial_meta()
            self._meta["distributed"] = {"world_size": self._world, "backend": backend}
            self._meta["kernel"] = native.STATE if on_cpu else "not used (the model is on an accelerator)"
            write_json(self.run_dir / "meta.json", self._meta)
        self._sid = C.register_scope(self)
        try:
            self._modes = ModeAudit(self.model, canonical_names(self.model), self._explicit_opt)
        except Exception as e:  # never break the user's training
            self._modes = None
            self._note_error("modes", e)
        C.run_eagerly_at_top(Scope._on_root_pre, Scope._on_root_post)
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._on_root_pre))
        self._handles.append(root.register_forward_hook(self._on_root_post))
        self._step_hooks.attach()  # step 0 is sampled
        for i, plan in enumerate(self._plans):
            self._step_hooks.add(plan.module, self._make_hook(plan, i))
        if self._sentinels is not None:
            self._sentinels.register(self, self._step_hooks)
        self._handles += transformer_probes(self)  # attention logits, output log Z, massive activations
        self._handles.append(A.install(self))  # GradScaler: the loss scale, the skipped steps (amp.py)
        self._ensure_hook_guards()
        if self._explicit_opt is not None:
            self._handles.append(self._explicit_opt.register_step_pre_hook(self._on_opt_pre))
            self._handles.append(self._explicit_opt.register_step_post_hook(self._on_opt_post))
        else:
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )

            self._model_param_ids = {id(p) for p in self.model.parameters()}
            self._handles.append(register_optimizer_step_pre_hook(self._on_opt_pre))
            self._handles.append(register_optimizer_step_post_hook(self._on_opt_post))
        self._active = True
        return self

    def close(self, status: str = "complete") -> None:
        if not self._active:
            return
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._step_hooks.clear()
        C.unregister_scope(self._sid)
        failed = not status.startswith("complete")
        try:
            if self._world > 1:
                # every rank closes at the same point and joins the last check, unless this one
                # failed: then it must not enter a collective its peers never reach
                if not failed:
                    self._finish_step(updated=False, params=False)
            elif self._pending or self._scalars or self._signals:
                self._finish_step(updated=False, params=False)
            self._end_modes(emit=False)
            self._flush()
        finally:
            if self._writer is not None:
                if isinstance(self._meta.get("amp"), dict):
                    self._meta["amp"]["skipped_steps"] = self._amp_skipped
                self._meta.update(
                    status=status,
                    ended=_now(),
                    steps_seen=self.step_index,
                    optimizer_steps=self._optimizer_steps,
                    hook_errors=self._hook_errors,
                )
                write_json(self.run_dir / "meta.json", self._meta)
            self._scratch.clear()
            self._params.release()
            self._recent.clear()

    @property
    def hook_count(self) -> int:
        """Hooks installed: the root's and optimizer's, and the modules' (attached on sampled steps)."""
        return len(self._handles) + len(self._step_hooks)

    @property
    def is_writer(self) -> bool:
        """True on the process that writes the run directory (rank 0 under torch.distributed)."""
        return self._rank == 0

    # --- stepping ----------------------------------------------------------------------------
    def step(self) -> None:
        """Advance one training step (only needed when no optimizer step drives the scope)."""
        if not self._active:
            raise NormscopeError("scope.step() called outside the watch() block: call it inside `with`.")
        if self._optimizer_steps:
            if not self._warned_manual:
                warnings.warn(
                    "normscope: steps already advance with the optimizer; scope.step() is ignored.",
                    stacklevel=2,
                )
                self._warned_manual = True
            return
        self._manual_steps += 1
        self._end_modes(emit=self._sampling)
        if self._sampling:
            # a manual update loop: ‖Δw‖ against the snapshot taken at the step's first forward
            self._guard(self._params.after_step, self._params.has_snapshot)
            self._finish_step(updated=False, params=True)
        self._advance()

    def log(self, phase: str = "train", **values: float | torch.Tensor) -> None:
        """Record scalars (loss, accuracy, ...) for sampled steps.

        Called before the step ends they join the step's single host transfer. Called after
        ``optimizer.step()`` and before the next forward (the usual place for ``loss.item()``),
        they belong to the step that just ended.
        """
        if not self._active:
            raise NormscopeError("scope.log() called outside the watch() block: call it inside `with`.")
        for k, v in values.items():
            if isinstance(v, torch.Tensor) and v.numel() == 0:
                raise NormscopeError(f"scope.log({k}=...) got an empty tensor: log a number or a tensor with a value.")
        if self._modes is not None:
            self._modes.on_log(phase, list(values))
        if self._forward_since_advance or self.step_index == 0:
            if not self._sampling:
                return
            for k, v in values.items():
                if isinstance(v, torch.Tensor):
                    v = v.detach().reshape(-1)[:1].double()
                self._scalars.append((phase, k, v))
            return
        prev = self.step_index - 1
        if prev % self.every != 0 or self._writer is None:
            return
        for k, v in values.items():
            v = float(v.detach().reshape(-1)[0]) if isinstance(v, torch.Tensor) else float(v)
            self._writer.append("scalars", {"step": prev, "phase": phase, "name": k, "value": v})

    def emit(self, phase: str, layer: str, call: int, names: tuple[str, ...], values: torch.Tensor) -> None:
        """Queue named measurements of one layer call for this sampled step's single host transfer.

        ``values``: a 1-D tensor with one entry per name, on any device (float64 keeps them exact);
        they become rows of the ``signals`` table (step, phase, layer, call, name, value). The
        collector's probes (attention logits, BN running statistics, ...) call this from their hooks
        or at step end; nothing is copied to the host here.
        """
        if len(names) != values.numel():
            raise ValueError(f"emit: {len(names)} names for {values.numel()} values")
        self._signals.append((phase, layer, int(call), tuple(names), values.detach().reshape(-1)))

    def _owns(self, opt) -> bool:
        if self._explicit_opt is not None:
            return opt is self._explicit_opt
        if self._opt is not None:
            return opt is self._opt
        ids = self._model_param_ids
        if any(id(p) in ids for g in opt.param_groups for p in g["params"]):
            self._opt = opt
            return True
        return False

    def _on_opt_pre(self, opt, args, kwargs) -> None:
        if not self._owns(opt) or not self._sampling:
            return
        # (args: step()'s own, the optimizer first; a closure second or by keyword)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        self._guard(self._params.before_step, opt, closure is not None)

    def _on_opt_post(self, opt, args, kwargs) -> None:
        if not self._owns(opt):
            return
        self._optimizer_steps += 1
        if self._optimizer_steps == 1 and not self._forward_since_advance and not self._warned_unhooked:
            self._warn_unhooked()
        if self._optimizer_steps == 1 and self._modes is not None:
            self._audit("set_optimizer", opt)
        self._end_modes(emit=self._sampling)
        if self._sampling:
            self._guard(self._params.after_step, True)
            self._finish_step(updated=True, params=True)
        self._advance()

    @property
    def _grads_now(self) -> bool:
        """Gradient statistics this sampled step (every ``grad_every``-th one)."""
        return self.record_grads and (self.step_index // self.every) % self.grad_every == 0

    def _ensure_hook_guards(self) -> None:
        """Once torch.compile is in the process (at start, or first seen at a step's end): drop the
        code traced without the hooks and make compiled code guard on them."""
        if not self._hook_guards and "torch._dynamo" in sys.modules:
            self._hook_guards = True
            self._drop_stale_compiled_code()

    def _switch_hooks(self) -> None:
        """The modules' hooks for the next step: attached when it is sampled, else removed, so that
        an unsampled step takes torch's hook-free call path (step_hooks.py). Dynamo imported since
        start (torch.compile maybe called while the hooks were off): from now on compiled code
        guards on hooks, and code compiled without them is dropped, so that a sampled step
        recompiles with the hooks instead of silently running code that has none."""
        hooks = self._step_hooks
        if hooks.pinned:
            return
        try:
            self._ensure_hook_guards()
            hooks.attach() if self._sampling else hooks.detach()
        except Exception as e:  # never break the user's training: keep the hooks on
            hooks.pinned = True
            self._note_error("hooks", e)

    def _advance(self) -> None:
        self.step_index += 1
        self._sampling = self.step_index % self.every == 0
        self._switch_hooks()
        self._calls.clear()
        self._recent.clear()
        self._axes.clear()
        self._await_grad.clear()
        self._grad_slots.clear()
        self._snapped = False
        self._forward_since_advance = False

    def _end_modes(self, emit: bool) -> None:
        """Classify this step's forwards by mode; on sampled steps emit the frozen BN layers' drift."""
        if self._modes is None:
            return
        try:
            frozen_train = self._modes.end_step(self.step_index)
            if emit and self._modes.frozen and self._writer is not None:  # (per-rank values: the writer's)
                for layer, names, vals in self._modes.drift(frozen_train):
                    self.emit("train", layer, 0, names, vals)
        except Exception as e:  # never break the user's training
            self._modes = None
            self._note_error("modes", e)

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # never break the user's training
            self._note_error("parameters", e)

    def _audit(self, method: str, *args) -> None:
        """Call the mode audit; on an error note it once and stop auditing (training goes on)."""
        try:
            getattr(self._modes, method)(*args)
        except Exception as e:  # never break the user's training
            self._modes = None
            self._note_error("modes", e)

    def _note_error(self, where: str, e: BaseException) -> None:
        msg = f"{where}: {type(e).__name__}: {e}"
        if msg not in self._hook_errors:
            self._hook_errors.append(msg)
            warnings.warn(
                f"normscope stopped recording {where} after an error ({msg}); training goes on.", stacklevel=3
            )

    # --- metadata ----------------------------------------------------------------------------
    def _initial_meta(self) -> dict:
        return initial_meta(self.model, self.name, self._plans, self._options)


def _unwrap_optimizer(opt):
    """The torch optimizer inside wrappers (accelerate's AcceleratedOptimizer, Lightning's, ...)."""
    seen = 0
    while opt is not None and seen < 4 and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
        seen += 1
    return opt


def watch(model: nn.Module, run_dir: str | os.PathLike | None = None, every: int = DEFAULT_EVERY, **options) -> Scope:
    """Watch ``model`` while it trains; use as ``with normscope.watch(model) as scope: ...``.

    Steps advance with the optimizer (any optimizer over the model's parameters, detected by a
    global step hook, or the one passed as ``optimizer=``) or with ``scope.step()``. Every
    ``every``-th step is sampled. Options: ``include``/``exclude`` (name globs or module types),
    ``optimizer``, ``flush_every``, ``flush_seconds``, ``hist_max``, ``channel_axis``
    ({name glob: axis}), ``track_updates``, ``grads``, ``name``, ``roles``; bounds on the pack
    (docs/scale.md): ``max_channels`` (a tensor with more channels is reduced as one channel: no
    per-channel statistics for it) and ``grad_every`` (output-gradient statistics on every k-th
    sampled step only); ``stats``: which statistics each hooked output gets, ``"minimal"``
    (min, max, mean, std and the NaN/Inf counts: the cheapest), ``"standard"`` (the default: also
    mean |x|, zero / non-positive / saturated fractions, per-channel moments, activity and a
    histogram of at most ``hist_max`` elements) or ``"full"`` (standard, its histogram over every
    element); what a preset leaves out is stored as NaN or an empty list (README: the stats= table).
    """
    return Scope(model, run_dir=run_dir, every=every, **options)
