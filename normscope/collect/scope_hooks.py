"""The hook path of a :class:`~normscope.collect.scope.Scope`: what runs inside the user's forward.

The root module's pre/post hooks set the phase of the whole forward and feed the mode audit; each
planned module's forward hook reduces its output(s) (and input, for norms) on device into a pack
and registers a tensor hook for the gradient w.r.t. each output. Handles gradient checkpointing
(a recomputed forward is not a new call; a reentrant one delivers its outputs' gradients there),
torch.func transforms (skipped with one warning) and the reuse of a producer's reduction for the
norm that consumes the same, unchanged tensor. A mixin of ``Scope``, like ``StepEnd``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from normscope.collect import compiled as C
from normscope.collect import reducers as R
from normscope.collect.decode import PendingEntry
from normscope.collect.outputs import iter_float_tensors
from normscope.collect.select import HookPlan, resolve_axis
from normscope.store.writer import write_json

_RECENT = 8  # outputs remembered per forward, to reuse a producer's reduction for a norm's input


@dataclass(frozen=True)
class CachedReduction:
    """A tensor reduced earlier in this forward, kept so that a consumer that sees the very same,
    unchanged tensor (a norm layer's input is its producer's output) reuses the reduction."""

    ref: weakref.ref
    version: int
    axis: int
    layout: R.ActLayout
    pack: torch.Tensor
    fast: bool
    specs: tuple  # (hist, sat) the reduction was computed for

    def matches(self, t: torch.Tensor, specs: tuple | None = None) -> bool:
        return self.ref() is t and (specs is None or (self.version == t._version and self.specs == specs))


def axis_through_view(view: torch.Tensor, base: torch.Tensor, axis: int) -> int | None:
    """The axis of ``view`` that holds ``base``'s channel axis: the one with its stride and size
    (a slice along another axis keeps it in place, a transpose moves it). None when not unique."""
    if base.dim() == 0 or view.dim() == 0:
        return None
    a = axis % base.dim()
    stride, size = base.stride(a), base.shape[a]
    hits = [i for i in range(view.dim()) if view.stride(i) == stride and view.shape[i] == size]
    if len(hits) != 1:
        return None
    return -1 if hits[0] == view.dim() - 1 else hits[0]


def _cacheable(t: torch.Tensor) -> bool:
    """Inference-mode tensors have no version counter (reading ``_version`` raises), so a
    reduction of one cannot be proven still valid: never cached."""
    return not t.is_inference()


_AXES = 4096  # outputs of one forward whose channel axis a consumer may inherit


def functorch_level() -> int | None:
    """The functorch transform level when inside torch.func.grad/vmap/..., else None."""
    try:
        return torch._C._functorch.maybe_current_level()
    except AttributeError:  # pragma: no cover - older torch
        return None


def in_backward() -> bool:
    """True while the autograd engine runs (a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class ForwardHooks:
    # --- forward hooks -------------------------------------------------------------------------------
    def _on_root_pre(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return C.traced_root(self._sid, True, module, args)
        self._root_enter(module.training and torch.is_grad_enabled())

    def _root_enter(self, train: bool) -> None:
        self._forward_since_advance = True
        self._calls.clear()
        self._recent.clear()
        self._axes.clear()
        if self._sentinels is not None:
            self._sentinels.new_forward()
        if in_backward():  # a checkpointed root recomputed: keep the phase of the original forward
            return
        # the phase of the whole forward: modules inside a reentrant checkpoint run with grad off
        # in its first pass, yet belong to this training forward
        self._root_phase = "train" if train else "eval"
        if self._modes is not None:
            self._audit("on_forward")
        if (
            self._sampling
            and not self._snapped
            and self._manual_steps
            and not self._optimizer_steps
            and self.track_updates
        ):
            # a manual update loop (scope.step() advanced, no optimizer stepped): snapshot now so that
            # scope.step() can measure ‖Δw‖. Not before the loop shows itself: a copy of the weights
            # held through forward and backward raises peak memory, and an optimizer (the usual
            # case) needs none (its state gives ‖Δw‖, or it is copied at the optimizer step)
            self._snapped = True
            self._guard(self._params.snapshot)

    def _on_root_post(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return C.traced_root(self._sid, False, module, output)
        if not in_backward():
            self._root_phase = None
            if self._modes is not None:
                self._audit("after_forward", output)
        if self._writer is not None and self._exec_order is not None and self._exec_order:
            self._meta["execution_order"] = self._exec_order
            self._exec_order = None
            try:
                write_json(self.run_dir / "meta.json", self._meta)
            except OSError as e:
                self._note_error("meta.json", e)

    def _make_hook(self, plan: HookPlan, index: int):
        scope_ref = weakref.ref(self)
        sid, record_input = self._sid, plan.record_input

        def hook(module, args, output):
            if torch.compiler.is_compiling():  # dynamo traces this: custom ops only (normscope.collect.compiled)
                return C.traced_hook(sid, index, record_input, module, args, output)
            scope = scope_ref()
            if scope is None or not scope._sampling or plan.name in scope._disabled:
                return None
            try:
                if in_backward():  # gradient checkpointing recomputes the forward: not a new call,
                    scope._recomputed(plan, output)  # but a reentrant one gives its outputs' gradients here
                    return None
                if functorch_level() is not None:
                    scope._skip_functorch(plan)
                    return None
                scope._record(plan, args, output)
            except Exception as e:  # never break the user's training
                scope._disabled.add(plan.name)
                scope._note_error(plan.name, e)
            return None

        return hook

    def _phase_now(self, training: bool | None = None) -> str:
        """The phase of a call now: the running root forward's, else "train" when ``training``
        (default: the model in train mode with grad enabled), else "eval". Every recorder asks here."""
        if self._root_phase is not None:
            return self._root_phase
        if training is None:
            training = self.model.training and torch.is_grad_enabled()
        return "train" if training else "eval"

    def _begin_call(self, plan: HookPlan, training: bool) -> tuple[str, int]:
        """One recorded call of ``plan``'s module: its phase and call index; notes the execution order."""
        self._forward_since_advance = True
        phase = self._phase_now(training)
        call = self._calls[plan.name]
        self._calls[plan.name] = call + 1
        if self._exec_order is not None:
            k = (plan.name, call)
            if k not in self._order_seen:
                self._order_seen.add(k)
                self._exec_order.append({"layer": plan.name, "call": call, "type": plan.type_name})
        return phase, call

    def _record(self, plan: HookPlan, args, output) -> None:
        phase, call = self._begin_call(plan, self.model.training and torch.is_grad_enabled())
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        src = self._axes.get(id(x)) if x is not None else None
        src_axis = src[1] if src is not None and src[0]() is x else None
        via_view = False
        if src_axis is None and x is not None and x._base is not None:
            base = self._axes.get(id(x._base))  # a view of a recorded output (a slice, a transpose)
            if base is not None and base[0]() is x._base:
                src_axis = axis_through_view(x, x._base, base[1])
                via_view = src_axis is not None
        if plan.record_input and x is not None and x.is_floating_point():
            self._reduce_output(plan, phase, call, "input", x, src_axis, grad=False)
        for path, t in iter_float_tensors(output):
            # the consumed tensor's axis carries over through layout-preserving modules (same rank)
            # and through blocks whose output has the input's shape
            inherited = None
            if src_axis is not None and x is not None:
                same = t.dim() == x.dim() if plan.preserves_layout else t.shape == x.shape
                inherited = src_axis if same else None
            if via_view and inherited is not None:  # remembered for an inference-mode view, which has no _base
                self._inherited_axes[(plan.name, call, path)] = inherited
            elif inherited is None and x is not None and x.is_inference():
                inherited = self._inherited_axes.get((plan.name, call, path))
            self._reduce_output(plan, phase, call, path, t, inherited, grad=True)

    def _reduce_output(self, plan, phase, call, path, t, inherited, grad: bool, reuse: bool = True) -> None:
        key = (phase, plan.name, call, path)
        reuse = reuse and _cacheable(t)
        hit = self._recent.get(id(t)) if reuse else None
        if hit is not None and not hit.matches(t):
            hit = None  # a dead tensor whose id was reused: not this one
        specs = (plan.hist, plan.sat)
        if hit is not None and hit.matches(t, specs):
            axis, layout, pack, fast = hit.axis, hit.layout, hit.pack, hit.fast  # same tensor, unchanged: reuse
        else:
            axis = resolve_axis(plan, t, inherited if hit is None else hit.axis)
            layout = R.act_layout(t, axis, plan.hist, self.max_channels, self.stats)
            pack, fast = R.reduce_act(t, layout, plan.hist, plan.sat, self.hist_max, self._scratch)
            if reuse:
                if len(self._recent) >= _RECENT:
                    self._recent.pop(next(iter(self._recent)))
                self._recent[id(t)] = CachedReduction(weakref.ref(t), t._version, axis, layout, pack, fast, specs)
        if len(self._axes) >= _AXES:
            self._axes.pop(next(iter(self._axes)))
        self._axes[id(t)] = (weakref.ref(t), axis)
        self._pending.append(PendingEntry("act", key, layout, fast, pack, plan.type_name))
        if grad and self._grads_now and phase == "train":
            if t.requires_grad:
                t.register_hook(self._make_grad_hook(key, self.step_index))
            elif not torch.is_grad_enabled():  # first pass of a reentrant checkpoint: the gradient comes
                self._await_grad[plan.name].append(key)  # with the recomputation in the backward

    def _recomputed(self, plan: HookPlan, output) -> None:
        """A forward recomputed during the backward (gradient checkpointing): statistics were taken
        in the first pass; a reentrant checkpoint's first pass had no graph, so the gradient hooks
        go on the recomputed outputs, under the first pass's keys."""
        waiting = self._await_grad.get(plan.name)
        if not waiting or not self._grads_now:
            return
        key0 = waiting.pop(0)
        for path, t in iter_float_tensors(output):
            if t.requires_grad:
                t.register_hook(self._make_grad_hook((key0[0], key0[1], key0[2], path), self.step_index))

    def _skip_functorch(self, plan: HookPlan) -> None:
        if not self._warned_functorch:
            self._warned_functorch = True
            msg = ("forwards inside torch.func transforms (grad, vjp, vmap, jacrev, ...) are not recorded: "
                   "their tensors are functorch wrappers whose values the hooks cannot read")  # fmt: skip
            self._meta.setdefault("notes", []).append(msg)
            warnings.warn(f"normscope: {msg}; call the model outside the transform (torch.func.functional_call "
                          "alone is recorded).", stacklevel=3)  # fmt: skip

    def _make_grad_hook(self, key: tuple, step: int):
        scope_ref = weakref.ref(self)

        def grad_hook(g):
            scope = scope_ref()
            if scope is None or not scope._active or scope.step_index != step or key[1] in scope._disabled:
                return None
            try:
                pack, fast = R.reduce_grad(g)
                scope._pending.append(PendingEntry("grad", key, R.GradLayout(g.numel()), fast, pack))
            except Exception as e:
                scope._disabled.add(key[1])
                scope._note_error(key[1], e)
            return None

        return grad_hook
