"""Data flow between modules: which module's output feeds which module's input.

Three sources, best first (the one used is named in every structural finding's evidence):

- ``"fx"``: ``torch.fx`` symbolic tracing, every childless module kept as a leaf;
- ``"hooks"``: one real forward with forward hooks on the leaf modules and a
  ``TorchFunctionMode`` that follows tensors through functional code by identity (works where
  tracing fails on data-dependent control flow; needs example inputs, so the probe runs it);
- ``"execution-order"``: consecutive hooked layers in the run's recorded execution order (an
  approximation for purely sequential models; used when neither of the others is available).

A :class:`Graph` is plain data (JSON round-trip) so the probe can store it next to the run.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from normscope.roles import is_parametrization_path

GRAPH_SOURCES = ("fx", "hooks", "execution-order")
_ADD_NAMES = {"add", "iadd", "__add__", "__iadd__", "add_", "__radd__"}


@dataclass
class Node:
    id: str
    op: str  # "module", "function", "input", "output"
    module: str | None = None  # qualified module name for op == "module"
    type: str | None = None  # module type name, or function name
    attrs: dict = field(default_factory=dict)
    scope: list = field(default_factory=list)  # enclosing (non-leaf) module names, outermost first

    def to_json(self) -> dict:
        return {"id": self.id, "op": self.op, "module": self.module, "type": self.type,
                "attrs": self.attrs, "scope": self.scope}  # fmt: skip


class Graph:
    """A directed graph of module calls and functional ops."""

    def __init__(self, source: str):
        self.source = source
        self.nodes: dict[str, Node] = {}
        self.preds: dict[str, list[str]] = {}
        self.succs: dict[str, list[str]] = {}

    # --- building -------------------------------------------------------------------------
    def add_node(self, node: Node) -> Node:
        self.nodes[node.id] = node
        self.preds.setdefault(node.id, [])
        self.succs.setdefault(node.id, [])
        return node

    def add_edge(self, src: str, dst: str) -> None:
        if src not in self.preds[dst]:
            self.preds[dst].append(src)
            self.succs[src].append(dst)

    # --- queries ----------------------------------------------------------------------------
    def module_nodes(self, module: str | None = None) -> list[Node]:
        return [n for n in self.nodes.values() if n.op == "module" and (module is None or n.module == module)]

    def producers(self, node_id: str) -> list[Node]:
        return [self.nodes[i] for i in self.preds.get(node_id, [])]

    def consumers(self, node_id: str) -> list[Node]:
        return [self.nodes[i] for i in self.succs.get(node_id, [])]

    def upstream(self, node_id: str, stop: Callable[[Node], bool]) -> list[Node]:
        """Nodes reachable backwards from ``node_id``, not walking past nodes where ``stop`` holds
        (those are included, their inputs are not)."""
        seen: set[str] = set()
        out: list[Node] = []
        todo = deque(self.preds.get(node_id, []))
        while todo:
            i = todo.popleft()
            if i in seen:
                continue
            seen.add(i)
            n = self.nodes[i]
            out.append(n)
            if not stop(n):
                todo.extend(self.preds.get(i, []))
        return out

    def residual_blocks(self) -> list[str]:
        """Container modules that add two tensors inside their forward (residual blocks)."""
        blocks: list[str] = []
        for n in self.nodes.values():
            if n.op == "function" and n.type in _ADD_NAMES and n.scope and len(self.preds.get(n.id, [])) >= 2:
                b = n.scope[-1]
                if b not in blocks:
                    blocks.append(b)
        return blocks

    # --- serialisation ----------------------------------------------------------------------
    def to_json(self) -> dict:
        edges = [[s, d] for d, ps in self.preds.items() for s in ps]
        return {"source": self.source, "nodes": [n.to_json() for n in self.nodes.values()], "edges": edges}

    @classmethod
    def from_json(cls, data: dict) -> Graph:
        g = cls(data.get("source", "unknown"))
        for n in data.get("nodes", []):
            g.add_node(Node(n["id"], n["op"], n.get("module"), n.get("type"), dict(n.get("attrs") or {}),
                            list(n.get("scope") or [])))  # fmt: skip
        for s, d in data.get("edges", []):
            if s in g.nodes and d in g.nodes:
                g.add_edge(s, d)
        return g

    def __repr__(self) -> str:
        return f"Graph(source={self.source!r}, nodes={len(self.nodes)})"


def _fn_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or type(target).__name__
    if target in (operator.add, operator.iadd):
        return "add"
    return name


def _json_attr(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return None


def _is_layer_leaf(m) -> bool:
    """A childless module, or a parametrised layer (weight_norm: its only children compute its weight)."""
    kids = [n for n, _ in m.named_children()]
    return not kids or (kids == ["parametrizations"] and getattr(m, "parametrizations", None) is not None)


def trace_fx(model) -> Graph:
    """Trace ``model`` with torch.fx (childless modules are leaves). Raises on failure."""
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):  # noqa: D401
            return super().is_leaf_module(m, qualname) or _is_layer_leaf(m)

    fxg = _Tracer().trace(model)
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    g = Graph("fx")
    for n in fxg.nodes:
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        scope = [q for q, _ in stack if q]
        if n.op == "call_module":
            scope = [q for q in scope if q != n.target]
            node = Node(n.name, "module", module=str(n.target), type=types.get(str(n.target)), scope=scope)
        elif n.op in ("call_function", "call_method"):
            attrs = {k: _json_attr(v) for k, v in n.kwargs.items() if _json_attr(v) is not None}
            name = _fn_name(n.target)
            if name == "dropout" and "p" not in attrs and len(n.args) > 1:
                attrs["p"] = _json_attr(n.args[1])
            node = Node(n.name, "function", type=name, attrs=attrs, scope=scope)
        elif n.op == "placeholder":
            node = Node(n.name, "input", type="input")
        elif n.op == "output":
            node = Node(n.name, "output", type="output")
        else:  # get_attr
            node = Node(n.name, "function", type="get_attr", attrs={"target": str(n.target)}, scope=scope)
        g.add_node(node)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def _tensors(obj: Any, depth: int = 0) -> Iterable:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)


def trace_hooks(model, example_inputs: Any) -> Graph:
    """Record data flow during one real forward (no_grad) by tensor identity.

    Leaf modules become nodes through forward hooks; functional code between them is followed
    with a ``TorchFunctionMode``. The model's buffers (BN running statistics) are restored.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    g = Graph("hooks")
    producer: dict[int, str] = {}
    keep: list = []  # keeps tensors alive so their ids stay unique during the forward
    depth = [0]
    scope: list[str] = []
    calls: dict[str, int] = {}
    pending: list[list[str]] = []
    counter = [0]

    def prods(objs) -> list[str]:
        out = []
        for t in _tensors(objs):
            p = producer.get(id(t))
            if p is not None and p not in out:
                out.append(p)
        return out

    def mark(objs, node_id: str) -> None:
        for t in _tensors(objs):
            producer[id(t)] = node_id
            keep.append(t)

    leaves = {m: (name or "<root>") for name, m in model.named_modules()
              if _is_layer_leaf(m) and not is_parametrization_path(name)}  # fmt: skip
    containers = {m: name for name, m in model.named_modules() if name and m not in leaves}

    def leaf_pre(mod, args, kwargs):
        if depth[0] == 0:
            pending.append(prods((args, kwargs)))
        depth[0] += 1

    def leaf_post(mod, args, kwargs, out):
        depth[0] -= 1
        if depth[0] == 0:
            name = leaves[mod]
            k = calls.get(name, 0)
            calls[name] = k + 1
            nid = name if k == 0 else f"{name}#{k}"
            g.add_node(Node(nid, "module", module=name, type=type(mod).__name__, scope=list(scope)))
            for p in pending.pop():
                g.add_edge(p, nid)
            mark(out, nid)

    def cont_pre(mod, args):
        if depth[0] == 0:
            scope.append(containers[mod])

    def cont_post(mod, args, out):
        if depth[0] == 0 and scope:
            scope.pop()

    class _Follow(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if depth[0] == 0:
                ins = prods((args, kwargs))
                if ins and any(True for _ in _tensors(out)):
                    counter[0] += 1
                    name = _fn_name(func)
                    nid = f"{name}_{counter[0]}"
                    attrs = {}
                    if name == "dropout":
                        attrs["p"] = _json_attr(kwargs.get("p", args[1] if len(args) > 1 else None))
                    g.add_node(Node(nid, "function", type=name, attrs=attrs, scope=list(scope)))
                    for p in ins:
                        g.add_edge(p, nid)
                    mark(out, nid)
            return out

    handles = []
    for m in leaves:
        handles.append(m.register_forward_pre_hook(leaf_pre, with_kwargs=True))
        handles.append(m.register_forward_hook(leaf_post, with_kwargs=True))
    for m in containers:
        handles.append(m.register_forward_pre_hook(cont_pre))
        handles.append(m.register_forward_hook(cont_post))
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    for i, t in enumerate(_tensors(inputs)):
        nid = f"input_{i}"
        g.add_node(Node(nid, "input", type="input"))
        mark(t, nid)
    buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if not isinstance(v, torch.nn.Parameter)}
    try:
        with torch.no_grad(), _Follow():
            out = model(*inputs)
        g.add_node(Node("output", "output", type="output"))
        for p in prods(out):
            g.add_edge(p, "output")
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            sd = model.state_dict()
            for k, v in buffers.items():
                if k in sd and sd[k].shape == v.shape:
                    sd[k].copy_(v)
    return g


def from_execution_order(execution_order: list[dict], types: dict[str, str] | None = None) -> Graph:
    """Chain consecutive hooked layers of a run's execution order (an approximation)."""
    g = Graph("execution-order")
    prev = None
    types = types or {}
    for r in execution_order:
        layer, call = r["layer"], int(r.get("call", 0))
        nid = layer if call == 0 else f"{layer}#{call}"
        g.add_node(Node(nid, "module", module=layer, type=r.get("type") or types.get(layer)))
        if prev is not None:
            g.add_edge(prev, nid)
        prev = nid
    return g


def build_graph(model, example_inputs: Any = None) -> tuple[Graph | None, str | None]:
    """fx if it traces, else hooks when example inputs are given. Returns (graph, why_fx_failed)."""
    try:
        return trace_fx(model), None
    except Exception as e:  # tracing fails on data-dependent control flow: fall back
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    if example_inputs is not None:
        try:
            return trace_hooks(model, example_inputs), why
        except Exception as e:
            why += f"; hooks: {type(e).__name__}: {e}"[:200]
    return None, why
