"""The collector under ``torch.compile``: hooks that dynamo traces without a graph break.

Under the compiler (``torch.compiler.is_compiling()``) a hook does no Python bookkeeping of its
own. It calls the custom op ``normscope::observe`` with the module's tensors and a few ints (the
scope, the hook plan): dynamo sees an opaque operator, and at run time the op receives the real
tensors and does what the eager hook does (call-site counting, reductions, the pending entry),
reading the sampled/unsampled decision from the scope's Python state then. The graph is therefore
the same on sampled and unsampled steps: no recompilation with the cadence.

Gradients: the outputs that require grad pass through :class:`_Tap`, an autograd function whose
forward returns clones (inductor's ``remove_noop_ops`` removes them: no copy in the compiled
code) and calls ``observe`` on them; ``observe`` returns a small int64 token (step, slot) that
``_Tap`` saves, and its backward hands the token and the output gradients to the custom op
``normscope::observe_grad``, then returns the gradients unchanged. Both ops are registered as
effectful (ordered), so the compiler neither removes them as dead code nor reorders them.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Optional

import torch

_SCOPES: dict[int, weakref.ref] = {}
_IDS = itertools.count(1)
_REGISTERED = False
SEP = "\x1f"  # joins output paths into the one string argument of the op


def register_scope(scope) -> int:
    """An int id the compiled graph carries for ``scope`` (ints, never tensor ids, in the graph)."""
    ensure_ops()
    sid = next(_IDS)
    _SCOPES[sid] = weakref.ref(scope)
    return sid


def unregister_scope(sid: int) -> None:
    _SCOPES.pop(sid, None)


def run_eagerly_at_top(*fns) -> None:
    """Frames of ``fns`` that dynamo meets at the top level (a compiled module's own hooks, which
    ``torch.compile(module)`` calls outside its graph) run eagerly instead of becoming graphs of
    their own; inlined into a traced region (``torch.compile`` of an ``nn.Sequential`` or of a
    function that calls the model) they are still traced."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # pragma: no cover - a torch without the per-code frame strategy
        return
    for fn in fns:
        set_code_exec_strategy(fn.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))


def _scope(sid: int):
    ref = _SCOPES.get(sid)
    return ref() if ref is not None else None


def _no_token() -> torch.Tensor:
    return torch.full((2,), -1, dtype=torch.int64)


def ensure_ops() -> None:
    """Register the custom ops once (at the first ``watch()``, never at ``import normscope``)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch._library.effects import EffectType

    @torch.library.custom_op("normscope::observe", mutates_args=())
    def observe(
        xs: list[torch.Tensor], sid: int, plan: int, paths: str, has_input: bool, train: bool, ngrad: int
    ) -> torch.Tensor:
        scope = _scope(sid)
        if scope is None:
            return _no_token()
        return scope._observe_compiled(plan, xs, paths, has_input, train, ngrad)

    @observe.register_fake
    def _observe_fake(xs, sid, plan, paths, has_input, train, ngrad):
        return torch.empty(2, dtype=torch.int64)

    @torch.library.custom_op("normscope::observe_grad", mutates_args=())
    def observe_grad(gs: list[Optional[torch.Tensor]], token: torch.Tensor, sid: int) -> None:  # noqa: UP045
        scope = _scope(sid)
        if scope is not None:
            scope._observe_grad_compiled(token, gs)

    @observe_grad.register_fake
    def _observe_grad_fake(gs, token, sid):
        return None

    @torch.library.custom_op("normscope::root", mutates_args=())
    def root(xs: list[torch.Tensor], sid: int, enter: bool, train: bool) -> None:
        scope = _scope(sid)
        if scope is not None:
            scope._root_compiled(enter, train)

    @root.register_fake
    def _root_fake(xs, sid, enter, train):
        return None

    for name in ("normscope::observe", "normscope::observe_grad", "normscope::root"):
        torch.library._register_effectful_op(name, EffectType.ORDERED)
    _REGISTERED = True


class _Tap(torch.autograd.Function):
    """Identity on the outputs that require grad; records their statistics and gradients."""

    @staticmethod
    def forward(ctx, sid, plan, paths, has_input, train, n_other, *tensors):
        # tensors: [module input if has_input] + outputs requiring grad + other outputs (n_other)
        k = len(tensors) - n_other
        lead = 1 if has_input else 0
        taps = tuple(t.clone() for t in tensors[lead:k])
        xs = list(tensors[:lead]) + list(taps) + list(tensors[k:])
        token = torch.ops.normscope.observe(xs, sid, plan, paths, has_input, train, len(taps))
        ctx.save_for_backward(token)
        ctx.sid, ctx.n_lead, ctx.n_other = sid, lead, n_other
        ctx.set_materialize_grads(False)
        return taps

    @staticmethod
    def backward(ctx, *gs):
        (token,) = ctx.saved_tensors
        torch.ops.normscope.observe_grad(list(gs), token, ctx.sid)
        return (None,) * (6 + ctx.n_lead) + tuple(gs) + (None,) * ctx.n_other


def _flat(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``iter_float_tensors`` as a list, written so that dynamo traces it without a break."""
    from normscope.collect.outputs import _MAX_DEPTH

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() and obj.numel() > 0 else []
    if depth >= _MAX_DEPTH:
        return []
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (tuple, list)):
        items = list(enumerate(obj))
    else:
        return []  # dataclasses and other containers: not recorded under the compiler
    out = []
    for k, v in items:
        out.extend(_flat(v, f"{prefix}.{k}" if prefix else str(k), depth + 1))
    return out


def _replace(obj: Any, new: dict, prefix: str = "", depth: int = 0) -> Any:
    """``obj`` with the tensors at the paths in ``new`` replaced (tensor, tuple, list, dict)."""
    if isinstance(obj, torch.Tensor):
        return new.get(prefix, obj)
    if depth >= 4:
        return obj
    if isinstance(obj, dict):
        out = dict(obj) if type(obj) is dict else obj.copy()
        for k, v in obj.items():
            out[k] = _replace(v, new, f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    if isinstance(obj, (tuple, list)):
        vals = [_replace(v, new, f"{prefix}.{i}" if prefix else str(i), depth + 1) for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return vals
        return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
    return obj


def traced_hook(sid: int, plan: int, record_input: bool, module, args, output):
    """The body of a forward hook while dynamo traces it: opaque ops only, ints as arguments."""
    items = _flat(output)
    train = module.training and torch.is_grad_enabled()
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    has_input = record_input and x is not None and x.is_floating_point()
    lead = [x] if has_input else []
    grad = [(p, t) for p, t in items if train and t.requires_grad]
    other = [(p, t) for p, t in items if not (train and t.requires_grad)]
    paths = SEP.join([p for p, _ in grad] + [p for p, _ in other])
    if not grad:
        torch.ops.normscope.observe(lead + [t for _, t in other], sid, plan, paths, has_input, train, 0)
        return None
    taps = _Tap.apply(
        sid, plan, paths, has_input, train, len(other), *lead, *[t for _, t in grad], *[t for _, t in other]
    )
    return _replace(output, {p: t for (p, _), t in zip(grad, taps)})


def traced_root(sid: int, enter: bool, module, tensors) -> None:
    """A root forward starts or ends (its hooks inlined in a traced region). The op takes the
    forward's first tensor: inductor orders an op by its tensor arguments."""
    xs = [t for _, t in _flat(tensors)][:1]
    if not xs:  # no tensor to order it by: call sites then count on over the step's forwards
        return
    torch.ops.normscope.root(xs, sid, enter, module.training and torch.is_grad_enabled())
