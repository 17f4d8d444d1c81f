"""The per-module hooks only sampled steps need, attached for those steps alone.

A module with any forward hook takes torch's hooked call path (``Module._call_impl`` gathers the
hook dicts and calls every hook), a few µs per call even when the hook returns at once; on a model
of many small layers that is several per cent of every step (MobileNetV2 at 64×64: 4–7 %,
measured in benchmarks/overhead.py). So the hooks on the model's modules (the recorded modules,
the finiteness sentinels, the transformer probes' attention and block hooks) are attached when a
sampled step begins and removed when it ends: an unsampled step runs the model as the bare step
does, but for the root's own hooks (steps and phases) and the optimizer's.

Under ``torch.compile`` dynamo guards on hooks (``watch()`` turns those guards on), so attaching
and detaching would recompile at every switch: the first time compiled code runs normscope's ops
(``Scope._mark_compiled``) the hooks are pinned, attached for good. Re-attached hooks go after any
hook the user registered on the same module in between (ours never change an output).
"""

from __future__ import annotations

from torch import nn


def _register(spec):
    module, hook, pre, with_kwargs = spec
    if pre:
        return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    return module.register_forward_hook(hook, with_kwargs=with_kwargs)


class StepHooks:
    """Forward (pre-)hooks registered through :meth:`add`, attached or detached all together."""

    def __init__(self):
        self._specs: list[tuple] = []  # (module, hook, pre, with_kwargs)
        self._handles: list = []  # one per spec while attached
        self.attached = False
        self.pinned = False  # attached for good (compiled code runs them)

    def __len__(self) -> int:
        return len(self._specs)

    def add(self, module: nn.Module, hook, *, pre: bool = False, with_kwargs: bool = False) -> None:
        spec = (module, hook, pre, with_kwargs)
        self._specs.append(spec)
        if self.attached:
            self._handles.append(_register(spec))

    def truncate(self, n: int) -> None:
        """Forget every hook added after the first ``n`` (a registration that failed half-way)."""
        if self.attached:
            for h in self._handles[n:]:
                h.remove()
            del self._handles[n:]
        del self._specs[n:]

    def attach(self) -> None:
        if not self.attached:
            self._handles = [_register(s) for s in self._specs]
            self.attached = True

    def detach(self) -> None:
        if self.attached and not self.pinned:
            for h in self._handles:
                h.remove()
            self._handles = []
            self.attached = False

    def pin(self) -> None:
        self.pinned = True
        self.attach()

    def clear(self) -> None:
        """Remove every hook for good (the scope closes)."""
        for h in self._handles:
            h.remove()
        self._handles, self._specs = [], []
        self.attached = self.pinned = False
