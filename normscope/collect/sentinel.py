"""Finiteness flags on the modules the collector does not hook, so non-finite names the true first offender.

A NaN made by a parameter-free custom module (``x / x.sum(-1)``, a ``log`` in a helper module)
reaches the hooked modules downstream; the first *hooked* module with a NaN output is then not
the culprit. On sampled steps, every module that is not hooked (and is not the root or a
wrapper) gets one reduction per floating output: ``aminmax`` (one pass; NaN propagates, ±Inf
shows at an end; measured 20× cheaper than a float64 sum on the CPU). The two values join the
step's single host transfer; non-finite ones are recorded in
``meta.json`` (``nonfinite_modules``: step, phase, module, type, position in the forward), capped.
Outputs a hooked module already reduced (a container returning its child's tensor) are skipped.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from normscope.collect.outputs import iter_float_tensors
from normscope.collect.scope_hooks import in_backward

MAX_EVENTS = 64


class FiniteSentinels:
    def __init__(self, model: nn.Module, hooked: set[str], names: dict[str, str]):
        self.targets: list[tuple[str, nn.Module]] = []
        seen = set(hooked)
        for raw, m in model.named_modules():
            name = names.get(raw, raw)
            if raw == "" or not name or name in seen or type(m).__name__ in ("CheckpointWrapper", "OptimizedModule"):
                continue
            seen.add(name)
            self.targets.append((name, m))
        self.flags: list[tuple[str, str, str, int, torch.Tensor]] = []  # (phase, name, type, seq, sum)
        self.events: list[dict] = []
        self._seq = 0
        self._seen: dict[int, weakref.ref] = {}

    def register(self, scope, hooks) -> None:
        """Add the flags' hooks to ``hooks`` (a :class:`~normscope.collect.step_hooks.StepHooks`:
        attached on sampled steps only)."""
        ref = weakref.ref(scope)
        for name, m in self.targets:
            hooks.add(m, self._hook(ref, name, type(m).__name__))

    def new_forward(self) -> None:
        self._seq = 0
        self._seen.clear()

    def _hook(self, scope_ref, name: str, tname: str):
        def hook(module, args, output):
            if torch.compiler.is_compiling():  # eager only: under the compiler the flag would break the graph
                return None
            scope = scope_ref()
            if scope is None or not scope._sampling or scope._writer is None or len(self.events) >= MAX_EVENTS:
                return None  # (another rank under torch.distributed: the writer records its own flags)
            try:
                if in_backward():  # a checkpoint's recomputation
                    return None
                phase = scope._phase_now(module.training and torch.is_grad_enabled())
                for _, t in iter_float_tensors(output):
                    hit = scope._axes.get(id(t))
                    if hit is not None and hit[0]() is t:
                        continue  # a hooked module's tensor: its own statistics count NaN/Inf
                    seen = self._seen.get(id(t))
                    if seen is not None and seen() is t:
                        continue  # a container passing on its child's tensor: flagged once
                    self._seen[id(t)] = weakref.ref(t)
                    self._seq += 1
                    # the hooked call recorded just before this module finished: its place in execution order
                    last = next((e for e in reversed(scope._pending) if e.kind == "act"), None)
                    after = [last.key[1], last.key[2]] if last is not None else None
                    if not t.numel():
                        continue
                    flag = torch.stack(torch.aminmax(t.detach())).to(torch.float64)  # NaN and ±Inf propagate
                    self.flags.append((phase, name, tname, (self._seq, after), flag))
            except Exception:  # noqa: BLE001 - a flag must never break training
                return None
            return None

        return hook

    def take(self) -> list:
        f, self.flags = self.flags, []
        return f

    def record(self, step: int, flags: list, values) -> list[dict]:
        """Keep the non-finite flags of one step (``values``: their host sums), in forward order."""
        import math

        new = []
        for i, (phase, name, tname, (seq, after), _) in enumerate(flags):
            lo, hi = float(values[2 * i]), float(values[2 * i + 1])
            if not (math.isfinite(lo) and math.isfinite(hi)) and len(self.events) < MAX_EVENTS:
                ev = {"step": int(step), "phase": phase, "layer": name, "type": tname, "seq": int(seq), "after": after}
                self.events.append(ev)
                new.append(ev)
        return new
