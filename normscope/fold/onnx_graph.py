"""The ONNX graph as ``fold_onnx`` sees it: node/initializer maps, producers and consumers, and the
constants it can compute (through Identity, Constant, Shape/Expand/CastLike, ...).

Kept apart from the fold patterns (``onnx_fold.py``), which only ask this graph questions and
edit it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from normscope.fold.onnx_util import require, subgraphs


def _attr(node: Any, name: str, default: Any) -> Any:
    onnx = require("onnx")
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node: Any, name: str, value: Any) -> None:
    onnx = require("onnx")
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


class _Graph:
    """Constants, producers, consumers and ranks of the main graph."""

    def __init__(self, model: Any):
        onnx = require("onnx")
        from onnx import numpy_helper

        self.model, self.g = model, model.graph
        graph_inputs = {i.name for i in self.g.input}
        # an initializer that is also a graph input can be overridden at run time: not constant
        self.consts = {i.name: numpy_helper.to_array(i) for i in self.g.initializer if i.name not in graph_inputs}
        self.initially_used = {i for n in self.g.node for i in n.input}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            infos = [*inferred.value_info, *inferred.input, *inferred.output]
        except Exception:  # noqa: BLE001 - shape inference is best effort
            infos = []
        self.elem = {v.name: v.type.tensor_type.elem_type for v in infos}
        self.shape = {}  # static dims; None for a symbolic one
        for v in infos:
            if v.type.tensor_type.HasField("shape"):
                self.shape[v.name] = tuple(
                    int(d.dim_value) if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
                )
        for n in self.g.node:
            try:
                value = _fold_constant(n, self.consts, self.elem)
            except Exception:  # noqa: BLE001 - an op we cannot evaluate is simply not constant
                value = None
            if value is not None:
                self.consts[n.output[0]] = value
        self.reindex()
        self.outputs = {o.name for o in self.g.output}
        self.nested: set[str] = set()  # names read inside If/Loop bodies count as consumers
        for n in self.g.node:
            for a in n.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                        for sg in subgraphs(sub):
                            self.nested |= {i for sn in sg.node for i in sn.input}
        self.rank = {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}
        self.counter = 0
        self.replaced: set[str] = set()

    def reindex(self) -> None:
        """Producers and consumers of every tensor name (call again after a rewrite)."""
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def only_consumer(self, name: str, node: Any) -> bool:
        """``node`` is the only data consumer of ``name`` (Shape/Size read metadata only)."""
        users = [u for u in self.consumers.get(name, []) if u.op_type not in ("Shape", "Size")]
        return len(users) == 1 and users[0] is node and name not in self.outputs and name not in self.nested

    def rename_output(self, node: Any, new: str) -> None:
        """``node`` now writes ``new``; metadata readers of its old output follow (same shape)."""
        old = node.output[0]
        for u in self.consumers.get(old, []):
            if u.op_type in ("Shape", "Size"):
                u.input[:] = [new if i == old else i for i in u.input]
        node.output[0] = new

    def why_not_const(self, name: str) -> str:
        if name in {i.name for i in self.g.input}:
            return "it is a graph input (an initializer listed as an input can be replaced at run time)"
        p = self.producer.get(name)
        if p is None:
            return "it has no producer and no initializer"
        return f"it is computed by {p.op_type} from {', '.join(p.input) or 'nothing'}"

    def const(self, node: Any, index: int) -> Optional[np.ndarray]:
        if len(node.input) <= index or not node.input[index]:
            return None
        return self.consts.get(node.input[index])

    def new_const(self, like: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.counter += 1
        name = f"{like}_bnfold{self.counter}"
        self.g.initializer.append(numpy_helper.from_array(value, name))
        self.consts[name] = value
        self.replaced.add(like)
        return name

    def drop_info(self, name: str) -> None:
        for vi in list(self.g.value_info):
            if vi.name == name:
                self.g.value_info.remove(vi)

    def prune(self) -> None:
        """Remove nodes whose outputs nobody reads any more (the weight/bias computations a fold
        replaced), then initializers that were read before and are not now."""
        while True:
            used = {i for n in self.g.node for i in n.input} | self.outputs | self.nested
            dead = [n for n in self.g.node if n.output and not any(o in used for o in n.output if o)]
            if not dead:
                break
            for n in dead:
                self.g.node.remove(n)
        for init in list(self.g.initializer):
            if init.name not in used and (init.name in self.replaced or init.name in self.initially_used):
                self.g.initializer.remove(init)


def _reshape_axis(src: tuple, dst: tuple, axis: int) -> Optional[int]:
    """``match.reshape_axis`` on ONNX shapes that may have symbolic (None) dims: with all dims
    static, same size and same product before the axis; otherwise the axis and every dim after
    it must be static and equal in product (the element's index along the axis is then kept)."""
    from normscope.fold.match import reshape_axis

    if None not in src and None not in dst:
        return reshape_axis(src, dst, axis)
    tail = src[axis:]
    if None in tail:
        return None
    after = math.prod(src[axis + 1 :])
    for b in range(len(dst)):
        if dst[b] == src[axis] and None not in dst[b:] and math.prod(dst[b + 1 :]) == after:
            return b
    return None


def _fold_constant(n: Any, consts: dict, elem: dict) -> Optional[np.ndarray]:
    """The value of ``n``'s first output when it is a constant computable from constants by a
    small pure op; None otherwise."""
    from onnx import helper as oh
    from onnx import numpy_helper

    op = n.op_type
    if n.domain not in ("", "ai.onnx"):
        return None
    if op == "Constant":
        for a in n.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.array(oh.get_attribute_value(a), dtype=np.float32 if a.name == "value_float" else np.int64)
            if a.name in ("value_floats", "value_ints"):
                return np.array(oh.get_attribute_value(a), dtype=np.float32 if a.name == "value_floats" else np.int64)
        return None
    ins = [consts.get(i) if i else None for i in n.input]
    if op == "Shape":  # needs the input's shape only
        src = consts.get(n.input[0])
        if src is None:
            return None
        shape = np.array(src.shape, dtype=np.int64)
        start, end = _attr(n, "start", 0), _attr(n, "end", None)
        return shape[start:end]
    if op == "CastLike":
        if ins[0] is None:
            return None
        target = (
            ins[1].dtype
            if ins[1] is not None
            else (oh.tensor_dtype_to_np_dtype(elem[n.input[1]]) if elem.get(n.input[1]) else None)
        )
        return None if target is None else ins[0].astype(target)
    if any(x is None for x in ins if x is not None) or any(i and consts.get(i) is None for i in n.input):
        return None
    if op == "Identity":
        return ins[0]
    if op == "Cast":
        return ins[0].astype(oh.tensor_dtype_to_np_dtype(_attr(n, "to", 1)))
    if op == "Expand":
        return ins[0] * np.ones(tuple(int(d) for d in ins[1]), dtype=ins[0].dtype)
    if op == "Reshape":
        shape = [int(d) for d in ins[1]]
        shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return ins[0].reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else _attr(n, "axes", None)
        if op == "Squeeze":
            return np.squeeze(ins[0], axis=None if axes is None else tuple(int(a) for a in axes))
        out = ins[0]
        for a in sorted(int(a) % (out.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Concat":
        return np.concatenate(ins, axis=int(_attr(n, "axis", 0)))
    if op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        if op == "Div" and np.issubdtype(ins[0].dtype, np.integer):
            return None
        return fn(ins[0], ins[1]).astype(np.result_type(ins[0], ins[1]))
    if op == "Neg":
        return -ins[0]
    if op == "Transpose":
        perm = _attr(n, "perm", None)
        return np.transpose(ins[0], None if perm is None else tuple(int(p) for p in perm))
    return None


def _cast(value: np.ndarray, like: np.ndarray, what: str) -> np.ndarray:
    out = value.astype(like.dtype)
    if not (np.isfinite(value).all() and np.isfinite(out).all()):
        raise ValueError(f"folded {what} are not finite in {like.dtype}: refused")
    return out
