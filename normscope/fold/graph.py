"""Tracing: turn a model into data-flow graphs that the matcher can reason about.

The whole model is traced with ``torch.fx.symbolic_trace`` (path "torch.fx"). When its forward
does not trace (data-dependent control flow, unsupported Python), each child module is traced on
its own, recursively (path "torch.fx-partial"): folding inside a traced child preserves that
child's function exactly, so it is sound whatever the untraced parent does with it. BNs called
directly by an untraced forward are left alone, with the reason. Nothing is ever folded from
module names alone.

Shapes come from ``ShapeProp`` on the example inputs (child inputs are captured with forward
pre-hooks in one eager run); shape-dependent proofs hold for inputs of the example's rank.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_KINDS: list[tuple[type, str, tuple[str, ...]]] = [
    (nn.Conv1d, "conv", ("forward", "_conv_forward")),
    (nn.Conv2d, "conv", ("forward", "_conv_forward")),
    (nn.Conv3d, "conv", ("forward", "_conv_forward")),
    (nn.ConvTranspose1d, "convT", ("forward",)),
    (nn.ConvTranspose2d, "convT", ("forward",)),
    (nn.ConvTranspose3d, "convT", ("forward",)),
    (nn.Linear, "linear", ("forward",)),
    (nn.BatchNorm1d, "bn", ("forward",)),
    (nn.BatchNorm2d, "bn", ("forward",)),
    (nn.BatchNorm3d, "bn", ("forward",)),
    (nn.SyncBatchNorm, "bn", ("forward",)),
    (nn.Flatten, "flatten", ("forward",)),
    (nn.Identity, "identity", ("forward",)),
]
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def module_kind(m: nn.Module) -> Optional[str]:
    """'conv', 'convT', 'linear', 'bn', 'flatten' or 'identity' for a module whose forward is the
    stock PyTorch one (a subclass that overrides forward is something else); else None."""
    for cls, kind, methods in _KINDS:
        if isinstance(m, cls) and all(
            getattr(type(m), meth, None) is getattr(cls, meth, None) for meth in methods
        ):
            return kind
    if isinstance(m, _DROPOUT) and not m.training:
        return "identity"
    return None


def is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN_TYPES)


class FoldTracer(torch.fx.Tracer):
    """Default fx tracer, plus: stock Conv/ConvTranspose/Linear/BN subclasses stay leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_kind(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> GraphModule:
    graph = FoldTracer().trace(module)
    gm = GraphModule(module, graph, type(module).__name__)
    gm.training = module.training
    return gm


def one_line(exc: BaseException) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode (no BN statistic updates), no grad."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        with torch.no_grad():
            yield
    finally:
        for m, was in flags:
            m.training = was


def propagate_shapes(gm: GraphModule, inputs: tuple) -> Optional[str]:
    """Annotate node.meta['tensor_meta']; returns an error message or None."""
    from torch.fx.passes.shape_prop import ShapeProp

    prop = ShapeProp(gm)
    prop.extra_traceback = False
    try:  # ShapeProp prints a traceback on failure: keep stderr clean, return one line
        with eval_mode(gm), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure just disables shape proofs
        return one_line(exc)
    return None


def shape_of(node: Any) -> Optional[tuple[int, ...]]:
    if not isinstance(node, Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


@dataclass
class Scope:
    """One traced region: ``prefix`` is the module path of ``module`` in the model."""

    prefix: str
    module: nn.Module
    gm: GraphModule
    inputs: Optional[tuple]
    shape_error: Optional[str] = None

    def full(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local


@dataclass
class Tracing:
    path: str  # "torch.fx" | "torch.fx-partial" | "none"
    scopes: list[Scope]
    untraced: dict[str, str] = field(default_factory=dict)  # module path -> why not traced
    called: Optional[set[str]] = None  # names of modules called in the eager run (partial only)


def _capture_calls(model: nn.Module, inputs: tuple) -> tuple[dict[int, tuple], dict[int, str]]:
    """One eager run: first positional-bound inputs of every module call, and modules whose
    calls disagree in input ranks (their shape proofs are not reliable)."""
    first: dict[int, tuple] = {}
    ranks: dict[int, tuple] = {}
    unstable: dict[int, str] = {}
    handles = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = inspect.signature(mod.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            values = tuple(bound.arguments.values())
        except (TypeError, ValueError):
            values = tuple(args)
        sig = tuple(v.dim() if isinstance(v, torch.Tensor) else None for v in values)
        key = id(mod)
        if key not in first:
            first[key], ranks[key] = values, sig
        elif ranks[key] != sig:
            unstable[key] = "called with inputs of different ranks"

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with eval_mode(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return first, unstable


def trace_model(model: nn.Module, inputs: tuple) -> Tracing:
    """Trace the whole model, or fall back to tracing its children one by one."""
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types on untraceable code
        root_reason = one_line(exc)
    else:
        scope = Scope("", model, gm, inputs)
        scope.shape_error = propagate_shapes(gm, inputs)
        return Tracing("torch.fx", [scope])

    untraced = {"": root_reason}
    try:
        calls, unstable = _capture_calls(model, inputs)
    except Exception as exc:  # noqa: BLE001
        untraced[""] = f"{root_reason}; the eager run on the example inputs failed too: {one_line(exc)}"
        return Tracing("none", [], untraced, set())

    scopes: list[Scope] = []
    seen: set[int] = {id(model)}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if id(child) in seen:
                continue
            seen.add(id(child))
            if module_kind(child) is not None or not any(True for _ in child.children()):
                continue  # a leaf: nothing to fold inside it
            if id(child) not in calls:
                continue  # never called: its BNs are reported as such
            try:
                gm = trace(child)
            except Exception as exc:  # noqa: BLE001
                untraced[path] = one_line(exc)
                visit(child, path)
                continue
            scope = Scope(path, child, gm, calls[id(child)])
            if id(child) in unstable:
                scope.shape_error = unstable[id(child)]
            else:
                scope.shape_error = propagate_shapes(gm, scope.inputs)
            scopes.append(scope)

    visit(model, "")
    called = {n for n, m in model.named_modules(remove_duplicate=False) if id(m) in calls}
    return Tracing("torch.fx-partial" if scopes else "none", scopes, untraced, called)
