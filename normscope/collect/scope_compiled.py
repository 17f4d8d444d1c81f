"""The run-time side of torch.compile support for a :class:`~normscope.collect.scope.Scope`.

Under the compiler, hooks call normscope's custom ops (``normscope.collect.compiled``); at run
time those ops call back into these methods with the real tensors, and do what the eager hook
does. Also here: dropping code compiled before ``watch()`` and the warning when compiled code
runs without the hooks. A mixin of ``Scope``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from normscope.collect import compiled as C
from normscope.collect import reducers as R
from normscope.collect.decode import PendingEntry
from normscope.store.writer import write_json


class CompiledRuntime:
    # --- under torch.compile: called at run time by the custom ops of normscope.collect.compiled ---
    def _root_compiled(self, enter: bool, train: bool) -> None:
        try:
            if enter:
                self._mark_compiled()
            if enter:
                self._root_enter(train)
            else:
                self._on_root_post(None, None, None)
        except Exception as e:  # never break the user's training
            self._note_error("root", e)

    def _mark_compiled(self) -> None:
        """Note in meta.json that compiled code ran (the checks whose probes only run eagerly say so),
        and keep the modules' hooks attached from now on: dynamo guards on them, so switching them
        off for unsampled steps would recompile (step_hooks.py)."""
        if not self._step_hooks.pinned:
            self._step_hooks.pin()
        if self._writer is not None and "compiled" not in self._meta:
            self._meta["compiled"] = True

    def _observe_compiled(self, index: int, xs: list, paths: str, has_input: bool, train: bool, ngrad: int):
        """What the eager hook does, for one call of a compiled module: ``xs`` are the real tensors
        (the module's input first when ``has_input``, then its floating outputs, those that get a
        gradient first). Returns the token (step, slot) that the gradient op brings back."""
        self._mark_compiled()
        plan = self._plans[index]
        if not self._active or not self._sampling or plan.name in self._disabled:
            return C._no_token()
        try:
            phase, call = self._begin_call(plan, train)
            x = xs[0] if has_input else None
            outs = xs[1:] if has_input else xs
            names = paths.split(C.SEP)
            src = self._axes.get(id(x)) if x is not None else None
            src_axis = src[1] if src is not None and src[0]() is x else None
            if x is not None:
                self._reduce_output(plan, phase, call, "input", x, src_axis, grad=False, reuse=False)
            for path, t in zip(names, outs):
                inherited = None
                if src_axis is not None and x is not None:
                    same = t.dim() == x.dim() if plan.preserves_layout else t.shape == x.shape
                    inherited = src_axis if same else None
                # no reuse of a reduction by tensor identity: compiled kernels write buffers in place
                # without bumping their version counter
                self._reduce_output(plan, phase, call, path, t, inherited, grad=False, reuse=False)
            if ngrad and phase == "train" and self._grads_now:
                self._grad_slots.append((phase, plan.name, call, names[:ngrad]))
                return torch.tensor([self.step_index, len(self._grad_slots) - 1], dtype=torch.int64)
        except Exception as e:  # never break the user's training
            self._disabled.add(plan.name)
            self._note_error(plan.name, e)
        return C._no_token()

    def _observe_grad_compiled(self, token: torch.Tensor, gs: list) -> None:
        step, slot = token.tolist()
        if step < 0 or not self._active or step != self.step_index or slot >= len(self._grad_slots):
            return
        phase, name, call, names = self._grad_slots[slot]
        if name in self._disabled:
            return
        try:
            for path, g in zip(names, gs):
                if g is not None:
                    pack, fast = R.reduce_grad(g)
                    key = (phase, name, call, path)
                    self._pending.append(PendingEntry("grad", key, R.GradLayout(g.numel()), fast, pack))
        except Exception as e:
            self._disabled.add(name)
            self._note_error(name, e)

    def _drop_stale_compiled_code(self) -> None:
        """Code that torch.compile traced before watch() has no hook in it, and dynamo does not guard
        on hooks by default: it would run on, silently recording nothing. Drop it so that the next
        call retraces the model with the hooks (one recompilation)."""
        try:
            from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
            from torch._dynamo import config, external_utils

            # code compiled from now on guards on module hooks: code compiled for another instance
            # of the model without hooks is not reused for this one (a recompilation instead)
            config.skip_nnmodule_hook_guards = False

            codes, m = [], self.model
            for _ in range(8):
                fwd = getattr(type(m), "forward", None)
                if getattr(fwd, "__code__", None) is not None:
                    codes.append(fwd.__code__)
                inner = getattr(m, "_orig_mod", None)
                if not isinstance(inner, nn.Module):
                    break
                m = inner
            codes.append(external_utils.wrap_inline(lambda: None).__code__)  # compiled torch.nn containers
            stale = [c for c in codes if _debug_get_cache_entry_list(c)]
            for c in stale:
                reset_code(c)
            if stale:
                self._add_note("compiled code traced before watch() (without normscope's hooks) was dropped: "
                               "the next call recompiles the model once, with the hooks")  # fmt: skip
        except Exception as e:  # a torch without these internals: the first-step check still warns
            self._note_error("torch.compile", e)

    def _warn_unhooked(self) -> None:
        """An optimizer step of the model with no forward seen: the model ran without the hooks."""
        self._warned_unhooked = True
        msg = ("the model ran this step without calling normscope's hooks, so nothing is recorded: most likely "
               "code compiled by torch.compile before watch() (dynamo caches it without the hooks); call watch() "
               "before the first compiled call, or torch._dynamo.reset() after watch()")  # fmt: skip
        self._add_note(msg)
        warnings.warn(f"normscope: {msg}.", stacklevel=3)

    def _add_note(self, msg: str) -> None:
        notes = self._meta.setdefault("notes", [])
        if msg not in notes:
            notes.append(msg)
        if self._writer is not None:
            try:
                write_json(self.run_dir / "meta.json", self._meta)
            except OSError as e:
                self._note_error("meta.json", e)
