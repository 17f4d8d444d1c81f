"""Dynamic loss scaling (``torch.amp.GradScaler``): the scale the backward ran under, and the steps the scaler skipped.

Mixed-precision training multiplies the loss by a scale S before ``backward()`` so that small
fp16 gradients do not underflow; ``scaler.step(optimizer)`` divides the parameters' gradients by
S and skips the optimizer step when any of them is Inf/NaN (an overflow), and ``update()``
halves S after a skipped step and doubles it after ``growth_interval`` clean ones. Two things
follow for a collector that hooks the backward:

- the gradients w.r.t. module outputs it reduces are S times the true ones (the parameters'
  gradients, read at the optimizer step, are already divided by S);
- an overflow is expected, handled behaviour (the step is skipped, nothing is harmed), not the
  NaN of a broken run; and a skipped iteration calls no ``optimizer.step()``, so without notice
  it would merge into the next step's statistics.

While a scope is active, ``GradScaler.step`` (the one method every subclass, FSDP's
``ShardedGradScaler`` included, inherits unchanged) is wrapped: before it, the owning scope takes
a reference to the scale tensor (no host read: it joins the step's single transfer); after it,
when the optimizer did not step, the scope ends the iteration as a *skipped* step. The grads
table is then written divided by S (norm, rms and max |g| are linear in it; the counts do not
change), and the scalars table gets, per sampled step, phase ``"amp"``: ``loss_scale``,
``skipped`` (1 for a skipped step) and ``skipped_total`` (skipped steps so far, every step
counted, sampled or not). ``meta.json`` ``amp`` describes the scaler.
"""

from __future__ import annotations

import threading
import weakref

_LOCK = threading.Lock()
_SCOPES: list[weakref.ref] = []
_ORIG = None  # GradScaler.step as torch defines it, while wrapped


def _wrapped_step(self, optimizer, *args, **kwargs):
    scopes = [s for s in (r() for r in list(_SCOPES)) if s is not None] if getattr(self, "_enabled", False) else []
    for s in scopes:
        s._amp_before(self, optimizer)
    try:
        return _ORIG(self, optimizer, *args, **kwargs)
    finally:
        for s in scopes:
            s._amp_after(self, optimizer)


class _Handle:
    def __init__(self, ref: weakref.ref):
        self._ref = ref

    def remove(self) -> None:
        global _ORIG
        from torch.amp import GradScaler

        with _LOCK:
            if self._ref in _SCOPES:
                _SCOPES.remove(self._ref)
            if not _SCOPES and _ORIG is not None:
                GradScaler.step = _ORIG
                _ORIG = None


def install(scope) -> _Handle:
    """Wrap ``GradScaler.step`` for ``scope`` (until the handle is removed)."""
    global _ORIG
    from torch.amp import GradScaler

    ref = weakref.ref(scope)
    with _LOCK:
        if _ORIG is None:
            _ORIG = GradScaler.step
            GradScaler.step = _wrapped_step
        _SCOPES.append(ref)
    return _Handle(ref)


def describe(scaler) -> dict:
    """The scaler's type and schedule (host values only)."""
    out = {"type": type(scaler).__name__}
    for k, attr in (("growth_factor", "_growth_factor"), ("backoff_factor", "_backoff_factor"),
                    ("growth_interval", "_growth_interval"), ("init_scale", "_init_scale")):  # fmt: skip
        v = getattr(scaler, attr, None)
        if isinstance(v, (int, float)):
            out[k] = v
    return out


class LossScaling:
    """The scope's side (a mixin of :class:`~normscope.collect.scope.Scope`)."""

    _amp_scale = None  # this step's scale tensor (set in scaler.step, before the optimizer steps)
    _amp_skipped = 0  # skipped steps so far
    _amp_steps_at = -1  # the optimizer-step count when scaler.step began
    _amp_meta = False
    _amp_seen = False  # a scaler has stepped this scope's optimizer

    def _amp_before(self, scaler, optimizer) -> None:
        try:
            from normscope.collect.scope import _unwrap_optimizer

            if not self._active or not self._owns(_unwrap_optimizer(optimizer)):
                return
            scale = getattr(scaler, "_scale", None)
            self._amp_scale = scale if scale is not None and scale.numel() == 1 else None
            self._amp_steps_at = self._optimizer_steps
            self._amp_seen = True
            if not self._amp_meta and self._writer is not None:
                self._meta["amp"] = describe(scaler)
                self._amp_meta = True
        except Exception as e:  # never break the user's training
            self._note_error("loss scaling", e)

    def _amp_after(self, scaler, optimizer) -> None:
        if self._amp_steps_at < 0:
            return
        try:
            if self._active and self._optimizer_steps == self._amp_steps_at:
                # the scaler found Inf/NaN gradients and did not step the optimizer: a skipped step
                self._amp_skipped += 1
                self._end_modes(emit=self._sampling)
                if self._sampling:
                    self._finish_step(updated=False, params=False, skipped=True)
                self._advance()
        except Exception as e:  # never break the user's training
            self._note_error("loss scaling", e)
        finally:
            self._amp_steps_at = -1
            self._amp_scale = None

    def _amp_tail(self) -> list:
        """The tensors this step adds to the transfer: the scale, when a scaler is stepping."""
        s = self._amp_scale
        return [s.detach().reshape(1).double()] if s is not None else []

    def _amp_rows(self, writer, step: int, skipped: bool, scale: float | None) -> None:
        if not self._amp_seen or (scale is None and not skipped):  # (a step no scaler stepped: eval, close)
            return
        rows = {"skipped": float(skipped), "skipped_total": float(self._amp_skipped)}
        if scale is not None:
            rows = {"loss_scale": scale, **rows}
        for name, v in rows.items():
            writer.append("scalars", {"step": step, "phase": "amp", "name": name, "value": v})
