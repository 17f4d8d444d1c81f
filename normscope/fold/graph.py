"""Tracing: turn a model into data-flow graphs that the matcher can reason about.

Two ways, tried in order:

- ``torch.fx.symbolic_trace`` of the whole model (path "torch.fx"), shapes from ``ShapeProp``
  on the example inputs;
- when the forward does not trace symbolically (control flow on shapes, ``int()`` of a proxy,
  unsupported Python), a data-flow graph recorded from ONE real forward on the example inputs
  (path "dataflow", :mod:`normscope.fold.dataflow`).

Both produce a ``torch.fx.Graph`` whose nodes are module calls, tensor ops and parameter reads,
so one matcher serves both. Nothing is ever folded from module names alone.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

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
        if isinstance(m, cls) and all(getattr(type(m), meth, None) is getattr(cls, meth, None) for meth in methods):
            return kind
    if isinstance(m, _DROPOUT) and not m.training:
        return "identity"
    return None


def is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN_TYPES)


class FoldTracer(torch.fx.Tracer):
    """Default fx tracer, plus: stock Conv/ConvTranspose/Linear modules and every BN (subclasses
    included: :mod:`normscope.fold.remainder` decides whether an overriding one folds) stay leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_kind(m) is not None or is_bn(m):
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
class ModuleScope:
    """One traced region: ``prefix`` is the module path of ``module`` in the model."""

    prefix: str
    module: nn.Module
    gm: GraphModule
    inputs: Optional[tuple]
    shape_error: Optional[str] = None

    def full(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local


def trace_fx(model: nn.Module, inputs: tuple) -> tuple[Optional[ModuleScope], str]:
    """The whole model with torch.fx, or (None, why it does not trace)."""
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types on untraceable code
        return None, one_line(exc)
    scope = ModuleScope("", model, gm, inputs)
    scope.shape_error = propagate_shapes(gm, inputs)
    return scope, ""


def script_modules(model: nn.Module) -> list[str]:
    """Paths of torch.jit scripted/traced modules in ``model`` ('' for the model itself)."""
    found = []
    try:
        items = list(model.named_modules())
    except Exception:  # noqa: BLE001 - a ScriptModule may not enumerate
        items = [("", model)]
    for name, m in items:
        if isinstance(m, torch.jit.ScriptModule):
            found.append(name)
    return found
