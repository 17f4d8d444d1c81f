"""A data-flow graph recorded from ONE real forward on the example inputs.

For models whose forward ``torch.fx`` cannot trace symbolically (control flow on shapes,
``int()`` of a proxy, …). The forward runs once, in eval mode and without grad, under a
``TorchFunctionMode`` plus forward hooks on every module:

- a call of a *leaf* module (stock Conv/ConvTranspose/Linear/Flatten/Identity/eval Dropout, any
  BatchNorm, a torch.jit module) becomes one ``call_module`` node; what runs inside it is not
  recorded;
- every other tensor operation becomes a ``call_function``/``call_method`` node whose inputs are
  the nodes that produced its tensor arguments (tensor identity; kept alive during the run);
- an in-place op (``relu_``, ``add_``, ``x[i] = …``, ``out=``) or an op returning one of its
  inputs (``nn.Identity``) makes the new node the producer of that tensor: later readers see the
  new version, and the old version has the in-place op as one more user;
- a parameter or buffer read outside its own module becomes a ``get_attr`` node (so its owner is
  known to be read directly);
- reads of metadata only (``.shape``, ``.size()``, ``.dim()``, dtype, device) are not uses;
- a tensor computed from the inputs (or from a random draw) turned into a Python value (``bool``, ``int``, ``float``,
  ``item()``, ``tolist()``, ``numpy()``) is recorded with the module whose forward did it: the
  control flow there may depend on the data, so one run does not prove the data flow of other
  inputs, and folds inside that module are refused.

The result is a ``torch.fx.Graph`` (never compiled: it only feeds the matcher) with
``meta['tensor_meta'].shape`` on tensor nodes, wrapped in :class:`DataflowGraph`, which answers
``get_submodule``/``modules`` from the real model.

What a forward does outside torch's Python API (C extensions, tensors stashed on ``self`` and
read by a later call) is not seen; the float64 verification of the folded model (which gates
every fold) is the proof on the example inputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.fx import Graph, Node
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

from normscope.fold.graph import eval_mode, is_bn, module_kind

_META_GETS = {
    "shape",
    "ndim",
    "dtype",
    "device",
    "is_cuda",
    "requires_grad",
    "layout",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "names",
    "grad_fn",
    "is_leaf",
    "itemsize",
    "nbytes",
}
_META_METHODS = {
    "size",
    "dim",
    "numel",
    "ndimension",
    "is_floating_point",
    "is_complex",
    "is_contiguous",
    "element_size",
    "get_device",
    "__len__",
    "stride",
    "storage_offset",
    "is_signed",
    "data_ptr",
    "nelement",
    "has_names",
    "is_nonzero_",
}
_TO_PYTHON = (bool, int, float, complex, list, tuple)
# random draws count as data: a branch on them may go the other way on the next call
_RANDOM = {
    "rand",
    "randn",
    "randint",
    "rand_like",
    "randn_like",
    "randint_like",
    "randperm",
    "bernoulli",
    "bernoulli_",
    "multinomial",
    "normal",
    "normal_",
    "uniform_",
    "random_",
    "exponential_",
    "poisson",
}


def _is_leaf(m: nn.Module) -> bool:
    return module_kind(m) is not None or is_bn(m) or isinstance(m, torch.jit.ScriptModule)


@dataclass
class DataflowGraph:
    """The recorded graph plus what the matcher and rewriter ask of a GraphModule."""

    graph: Graph
    model: nn.Module
    escapes: list[tuple[str, str]] = field(default_factory=list)  # (module path, conversion)
    called: set[str] = field(default_factory=set)
    output: Any = None

    def get_submodule(self, target: str) -> nn.Module:
        return self.model.get_submodule(target)

    def modules(self):  # noqa: ANN201 - mirrors nn.Module.modules
        return self.model.modules()

    def blocked(self, *names: str) -> Optional[str]:
        """Why a fold touching these modules is not proven by one run, or None."""
        for path, what in self.escapes:
            for name in names:
                if path == "" or name == path or name.startswith(path + "."):
                    where = f"'{path}'" if path else "the model"
                    return (
                        f"the forward of {where} turns a tensor computed from the inputs into a Python "
                        f"value ({what}): its control flow may depend on the data, so one traced run "
                        "does not prove the data flow for other inputs"
                    )
        return None


def _method_name(func: Any) -> tuple[str, Optional[str]]:
    """('method', name) for a Tensor method or property read, ('function', None) otherwise."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "property", getattr(owner, "__name__", "?")
    qual = getattr(func, "__qualname__", "") or ""
    if qual.startswith(("TensorBase.", "Tensor.")):
        return "method", name
    return "function", None


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.graph = Graph()
        self.env: dict[int, Node] = {}
        self.keep: list[Any] = []
        self.tainted: set[int] = set()  # ids of nodes computed from the inputs
        self.names = {id(m): n for n, m in model.named_modules()}
        self.params: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.params.setdefault(id(p), n)
        for n, b in model.named_buffers(remove_duplicate=False):
            self.params.setdefault(id(b), n)
        self.attr_nodes: dict[int, Node] = {}
        self.stack: list[str] = [""]  # non-leaf modules being run
        self.leaf_depth = 0
        self.pending: list[tuple] = []
        self.escapes: list[tuple[str, str]] = []
        self.called: set[str] = set()

    # -- values <-> nodes
    def node_of(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        key = id(value)
        if key in self.env:
            return self.env[key]
        if key in self.params:
            if key not in self.attr_nodes:
                self.attr_nodes[key] = self.graph.get_attr(self.params[key])
            return self.attr_nodes[key]
        node = self.graph.create_node("get_attr", "<tensor constant>", (), {})  # made outside the run
        self._meta(node, value)
        self.env[key] = node
        self.keep.append(value)
        return node

    def _meta(self, node: Node, value: Tensor) -> None:
        node.meta["tensor_meta"] = SimpleNamespace(shape=tuple(value.shape), dtype=value.dtype)

    def map_args(self, args: Any) -> Any:
        return _pytree.tree_map(self.node_of, args)

    def taint_of(self, args: Any) -> bool:
        return any(isinstance(n, Node) and id(n) in self.tainted for n in _pytree.tree_leaves(args))

    def bind(self, node: Node, out: Any, inputs: list[Tensor], tainted: bool) -> None:
        """Make ``node`` the producer of the tensors in ``out``."""
        if tainted:
            self.tainted.add(id(node))
        if isinstance(out, Tensor):
            self._meta(node, out)
            self.env[id(out)] = node
            self.keep.append(out)
            return
        leaves = _pytree.tree_leaves(out)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                item = self.graph.call_function(operator.getitem, (node, i))
                self._meta(item, leaf)
                if tainted:
                    self.tainted.add(id(item))
                self.env[id(leaf)] = item
                self.keep.append(leaf)

    # -- tensor operations
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.leaf_depth:
            return out
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - recording must never break the user's forward
            self.broken = True
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        kind, name = _method_name(func)
        if kind == "property" and name in _META_GETS and not isinstance(out, Tensor):
            return
        if kind == "method" and name in _META_METHODS:
            return
        n_args, n_kwargs = self.map_args(tuple(args)), self.map_args(dict(kwargs))
        tainted = self.taint_of((n_args, n_kwargs)) or (name or getattr(func, "__name__", "")) in _RANDOM
        tensors = [x for x in _pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        if not isinstance(out, Tensor) and not any(isinstance(x, Tensor) for x in _pytree.tree_leaves(out)):
            if tainted and (isinstance(out, _TO_PYTHON) or type(out).__module__.startswith("numpy")):
                self.escapes.append((self.stack[-1], f"Tensor.{name}" if name else getattr(func, "__name__", "?")))
            if not (name == "__setitem__" or (name or "").endswith("_")):
                return
        if kind == "function":
            node = self.graph.call_function(func, n_args, n_kwargs)
        else:
            node = self.graph.call_method(name or "?", n_args, n_kwargs)
        # in-place: x.op_(…), x[i] = …, out=…: the node now produces that tensor
        mutated: list[Tensor] = []
        if (
            name
            and (name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"))
            and args
            and isinstance(args[0], Tensor)
        ):
            mutated.append(args[0])
        if isinstance(kwargs.get("out"), Tensor):
            mutated.append(kwargs["out"])
        if kwargs.get("inplace") is True and args and isinstance(args[0], Tensor):
            mutated.append(args[0])
        for t in mutated:
            self._meta(node, t)
            self.env[id(t)] = node
            self.keep.append(t)
            if tainted:
                self.tainted.add(id(node))
        if out is not None and not (mutated and isinstance(out, Tensor) and any(out is t for t in mutated)):
            self.bind(node, out, tensors, tainted)

    # -- module calls
    def pre_hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.leaf_depth:
            if _is_leaf(mod):
                self.leaf_depth += 1
            return
        name = self.names.get(id(mod), "?")
        self.called.add(name)
        if _is_leaf(mod):
            self.pending.append((self.map_args(tuple(args)), self.map_args(dict(kwargs))))
            self.leaf_depth += 1
        else:
            self.stack.append(name)

    def post_hook(self, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if _is_leaf(mod):
            self.leaf_depth -= 1
            if self.leaf_depth:
                return
            n_args, n_kwargs = self.pending.pop()
            node = self.graph.call_module(self.names.get(id(mod), "?"), n_args, n_kwargs)
            tensors = [x for x in _pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
            self.bind(node, out, tensors, self.taint_of((n_args, n_kwargs)))
        elif not self.leaf_depth and len(self.stack) > 1:
            self.stack.pop()


def _output_leaves(out: Any) -> list[Any]:
    leaves = []
    for leaf in _pytree.tree_leaves(out):
        if hasattr(leaf, "to_tuple") and not isinstance(leaf, Tensor):  # transformers' ModelOutput
            leaves += _output_leaves(leaf.to_tuple())
        elif isinstance(leaf, dict):
            leaves += _output_leaves(list(leaf.values()))
        else:
            leaves.append(leaf)
    return leaves


def record(model: nn.Module, inputs: tuple, seed: Optional[int] = None) -> DataflowGraph:
    """Run ``model(*inputs)`` once (eval mode, no grad; with ``seed``, under that random seed)
    and return its data-flow graph (``.output``: what the forward returned). Raises whatever
    the forward raises."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return record(model, inputs)
    rec = _Recorder(model)
    rec.broken = False
    for leaf in _pytree.tree_leaves(inputs):
        if isinstance(leaf, Tensor):
            node = rec.graph.placeholder(f"input_{len(rec.env)}")
            rec._meta(node, leaf)
            rec.env[id(leaf)] = node
            rec.tainted.add(id(node))
    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(rec.post_hook, with_kwargs=True, always_call=True))
        with eval_mode(model), rec:
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    result = [rec.env.get(id(x)) if isinstance(x, Tensor) else None for x in _output_leaves(out)]
    rec.graph.output(tuple(r for r in result if r is not None))
    dg = DataflowGraph(rec.graph, model, rec.escapes, rec.called)
    dg.output = out
    if rec.broken:
        dg.escapes.append(("", "an operation the recorder could not follow"))
    return dg


__all__ = ["DataflowGraph", "record"]
