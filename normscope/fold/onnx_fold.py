"""``fold_onnx``: the same BN folding on an existing ONNX file (for models exported by other
tools), with numpy float64 math, then verified with onnxruntime (optimisations disabled).

Folds Conv, ConvTranspose (with groups), Gemm, MatMul(+Add) → BatchNormalization when the
producer's output has no other consumer and BN is in inference form with constant parameters;
and BatchNormalization → Conv with all pads 0. MatMul needs a rank-2 output (BN's channel axis 1
must be the MatMul's feature axis), proven with ONNX shape inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from normscope.errors import NormscopeError
from normscope.fold.onnx_util import compare_arrays, count_ops, random_feeds, require, session, subgraphs
from normscope.fold.results import FoldedPair, OnnxFoldResult, SkippedBN


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
        for n in self.g.node:
            if n.op_type == "Constant" and _attr(n, "value", None) is not None:
                self.consts[n.output[0]] = numpy_helper.to_array(_attr(n, "value", None))
        self.reindex()
        self.outputs = {o.name for o in self.g.output}
        self.nested: set[str] = set()  # names read inside If/Loop bodies count as consumers
        for n in self.g.node:
            for a in n.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        for sg in subgraphs(sub):
                            self.nested |= {i for sn in sg.node for i in sn.input}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            infos = [*inferred.value_info, *inferred.input, *inferred.output]
        except Exception:  # noqa: BLE001 - shape inference is best effort
            infos = []
        self.rank = {v.name: len(v.type.tensor_type.shape.dim) for v in infos
                     if v.type.tensor_type.HasField("shape")}
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
        users = self.consumers.get(name, [])
        return len(users) == 1 and users[0] is node and name not in self.outputs and name not in self.nested

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
        used = {i for n in self.g.node for i in n.input} | self.outputs | self.nested
        for init in list(self.g.initializer):
            if init.name in self.replaced and init.name not in used:
                self.g.initializer.remove(init)
        for n in list(self.g.node):
            if n.op_type == "Constant" and n.output[0] in self.replaced and n.output[0] not in used:
                self.g.node.remove(n)


def _cast(value: np.ndarray, like: np.ndarray, what: str) -> np.ndarray:
    out = value.astype(like.dtype)
    if not (np.isfinite(value).all() and np.isfinite(out).all()):
        raise ValueError(f"folded {what} are not finite in {like.dtype}: refused")
    return out


def _producer_scale(w: np.ndarray, s: np.ndarray, op: str, group: int) -> np.ndarray:
    if op == "Conv":
        return w * s.reshape(-1, *([1] * (w.ndim - 1)))
    c_in, c_out_g = w.shape[:2]  # ConvTranspose: output channel of W[i, j] = (i // (c_in/g))·(c_out/g) + j
    full = np.broadcast_to(s.reshape(group, 1, c_out_g), (group, c_in // group, c_out_g)).reshape(c_in, c_out_g)
    return w * full.reshape(c_in, c_out_g, *([1] * (w.ndim - 2)))


def _set_input(G: _Graph, node: Any, index: int, value: np.ndarray, base: str) -> None:
    name = G.new_const(node.input[index] if len(node.input) > index and node.input[index] else base, value)
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _fold_producer(G: _Graph, bn: Any, s: np.ndarray, t: np.ndarray) -> str:
    """Fold into the node producing BN's input; returns the pattern or raises ValueError
    (before changing anything)."""
    x = bn.input[0]
    p = G.producer.get(x)
    if p is None:
        raise ValueError("input is a graph input")
    if not G.only_consumer(x, bn):
        raise ValueError(f"input '{x}' has other consumers")
    if p.op_type in ("Conv", "ConvTranspose"):
        w, b = G.const(p, 1), G.const(p, 2)
        if w is None or (len(p.input) > 2 and p.input[2] and b is None):
            raise ValueError(f"{p.op_type} weights are not constant")
        group = int(_attr(p, "group", 1))
        n_out = w.shape[0] if p.op_type == "Conv" else w.shape[1] * group
        if n_out != s.size:
            raise ValueError(f"{p.op_type} has {n_out} output channels, BN has {s.size}")
        new_w = _cast(_producer_scale(w.astype(np.float64), s, p.op_type, group), w, "weights")
        new_b = _cast(s * (0.0 if b is None else b.astype(np.float64)) + t, w if b is None else b, "bias")
        _set_input(G, p, 1, new_w, "")
        _set_input(G, p, 2, new_b, (p.name or p.output[0]) + "_bias")
        pattern = f"{p.op_type} → BatchNormalization"
    elif p.op_type == "Gemm":
        bm, c = G.const(p, 1), G.const(p, 2)
        if bm is None or (len(p.input) > 2 and p.input[2] and c is None):
            raise ValueError("Gemm B or C is not constant")
        trans_b, beta = int(_attr(p, "transB", 0)), float(_attr(p, "beta", 1.0))
        if (bm.shape[0] if trans_b else bm.shape[1]) != s.size:
            raise ValueError(f"Gemm has {bm.shape[0] if trans_b else bm.shape[1]} outputs, BN has {s.size}")
        new_bm = _cast(bm.astype(np.float64) * (s[:, None] if trans_b else s[None, :]), bm, "weights")
        new_c = _cast(s * beta * (0.0 if c is None else c.astype(np.float64)) + t, bm if c is None else c, "bias")
        _set_input(G, p, 1, new_bm, "")
        _set_input(G, p, 2, new_c, (p.name or p.output[0]) + "_C")
        _set_attr(p, "beta", 1.0)
        pattern = "Gemm → BatchNormalization"
    elif p.op_type in ("Add", "MatMul"):
        mm, bias_in, b = p, None, None
        if p.op_type == "Add":
            bias_in = 1 if G.const(p, 1) is not None else 0
            mm, b = G.producer.get(p.input[1 - bias_in]), G.const(p, bias_in)
            if mm is None or mm.op_type != "MatMul" or b is None or not G.only_consumer(p.input[1 - bias_in], p):
                raise ValueError("input comes from an Add that does not add a constant to a single-use MatMul")
            if b.size not in (1, s.size) or (b.ndim and b.shape[-1] != b.size):
                raise ValueError("the Add bias does not broadcast per feature")
        w = G.const(mm, 1)
        if w is None or w.ndim != 2 or w.shape[1] != s.size:
            raise ValueError(f"MatMul weight is not a constant matrix with {s.size} columns")
        if G.rank.get(x) != 2:
            raise ValueError(f"MatMul output rank is {G.rank.get(x, 'unknown')}: BN's channel axis 1 is "
                             "provably its feature axis only for rank 2")
        new_w = _cast(w.astype(np.float64) * s[None, :], w, "weights")
        new_b = None if b is None else _cast(s * b.astype(np.float64).reshape(-1) + t, b, "bias")
        shift = _cast(t, w, "shift") if b is None else None
        _set_input(G, mm, 1, new_w, "")
        if shift is not None:  # MatMul alone: the BN node becomes an Add of t
            bn.op_type, bn.domain = "Add", ""
            del bn.attribute[:]
            del bn.output[1:]
            bn.input[:] = [x, G.new_const((bn.name or bn.output[0]) + "_shift", shift)]
            return "MatMul → BatchNormalization (shift kept as Add)"
        _set_input(G, p, bias_in, new_b.reshape(-1) if b.ndim <= 1 else new_b.reshape(b.shape[:-1] + (-1,)), "")
        pattern = "MatMul + Add → BatchNormalization"
    else:
        raise ValueError(f"input comes from {p.op_type}, not Conv/ConvTranspose/Gemm/MatMul")
    p.output[0] = bn.output[0]
    G.drop_info(x)
    return pattern


def _fold_consumer(G: _Graph, bn: Any, s: np.ndarray, t: np.ndarray) -> str:
    y = bn.output[0]
    users = G.consumers.get(y, [])
    if len(users) != 1 or y in G.outputs or y in G.nested:
        raise ValueError(f"output has {len(users)} consumers")
    c = users[0]
    if c.op_type != "Conv" or c.input[0] != y:
        raise ValueError(f"output goes to {c.op_type}, not a Conv data input")
    pads = list(_attr(c, "pads", []))
    auto_pad = _attr(c, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        raise ValueError("the following Conv pads with zeros: the BN shift is not exact at the borders")
    w, b = G.const(c, 1), G.const(c, 2)
    if w is None or (len(c.input) > 2 and c.input[2] and b is None):
        raise ValueError("Conv weights are not constant")
    group = int(_attr(c, "group", 1))
    c_out, c_in_g = w.shape[:2]
    if c_in_g * group != s.size:
        raise ValueError(f"Conv reads {c_in_g * group} channels, BN has {s.size}")
    idx = (np.arange(c_out) // (c_out // group))[:, None] * c_in_g + np.arange(c_in_g)[None, :]
    w64 = w.astype(np.float64)
    new_w = w64 * s[idx].reshape(*idx.shape, *([1] * (w.ndim - 2)))
    new_b = (0.0 if b is None else b.astype(np.float64)) + (w64.reshape(c_out, c_in_g, -1).sum(-1) * t[idx]).sum(1)
    new_w, new_b = _cast(new_w, w, "weights"), _cast(new_b, w if b is None else b, "bias")
    _set_input(G, c, 1, new_w, "")
    _set_input(G, c, 2, new_b, (c.name or c.output[0]) + "_bias")
    c.input[0] = bn.input[0]
    G.drop_info(y)
    return "BatchNormalization → Conv"


def _bn_params(G: _Graph, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    if int(_attr(bn, "training_mode", 0)) != 0 or any(o for o in bn.output[1:]):
        raise ValueError("BatchNormalization is in training mode")
    if int(_attr(bn, "spatial", 1)) != 1:
        raise ValueError("spatial=0 BatchNormalization is not supported")
    vals = [G.const(bn, i) for i in range(1, 5)]
    if any(v is None for v in vals):
        raise ValueError("scale, bias, mean or variance is not a constant initializer")
    gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
    with np.errstate(all="ignore"):
        s = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        t = beta - mean * s
    if not (np.isfinite(s).all() and np.isfinite(t).all()):
        raise ValueError("BN statistics give a non-finite scale (σ²+ε ≤ 0?)")
    return s, t


def _fold_one(G: _Graph, bn: Any) -> tuple[Optional[FoldedPair], str]:
    name = bn.name or bn.output[0]
    try:
        s, t = _bn_params(G, bn)
    except ValueError as exc:
        return None, str(exc)
    role, layer = "producer", G.producer.get(bn.input[0])
    try:
        pattern = _fold_producer(G, bn, s, t)
        if bn.op_type == "BatchNormalization":  # (MatMul alone turns it into an Add)
            G.g.node.remove(bn)
    except ValueError as why_in:
        users = G.consumers.get(bn.output[0], [])
        role, layer = "consumer", users[0] if users else None
        try:
            pattern = _fold_consumer(G, bn, s, t)
        except ValueError as why_out:
            return None, f"input: {why_in}; output: {why_out}"
        G.g.node.remove(bn)
    layer_name = (layer.name or layer.output[0]) if layer is not None else "?"
    return FoldedPair(layer=layer_name, bn=name, pattern=pattern, role=role), ""


def fold_onnx(path_in: str | Path, path_out: str | Path, verify: bool = True, *, tolerance: float = 1e-4,
              seed: int = 0) -> OnnxFoldResult:
    """Fold BatchNormalization nodes of ``path_in`` into neighbouring Conv/ConvTranspose/Gemm/
    MatMul nodes; write ``path_out``; verify outputs on random inputs of the declared shapes."""
    onnx = require("onnx")
    path_in, path_out = Path(path_in), Path(path_out)
    if not path_in.is_file():
        raise NormscopeError(f"{path_in} does not exist: pass the path of an .onnx file")
    try:
        model = onnx.load(str(path_in))
    except Exception as exc:  # noqa: BLE001
        raise NormscopeError(f"{path_in} is not a readable ONNX file: {' '.join(str(exc).split())[:160]}") from None
    G = _Graph(model)
    folded: list[FoldedPair] = []
    skipped: list[SkippedBN] = []
    for _ in range(4):  # later passes catch chains such as BN → BN → Conv
        skipped = []
        done = 0
        for bn in [n for n in G.g.node if n.op_type == "BatchNormalization"]:
            pair, reason = _fold_one(G, bn)
            if pair is None:
                skipped.append(SkippedBN(bn.name or bn.output[0], reason))
            else:
                folded.append(pair)
                done += 1
                G.reindex()
        if not done or not skipped:
            break
    G.prune()
    onnx.checker.check_model(model)
    onnx.save(model, str(path_out))
    result = OnnxFoldResult(str(path_in), str(path_out), folded, skipped, count_ops(model), tolerance=tolerance)
    if verify:
        before, after = session(str(path_in)), session(str(path_out))
        feeds = random_feeds(before, seed)
        result.max_abs_err, result.max_rel_err = compare_arrays(before.run(None, feeds), after.run(None, feeds))
        result.verified = result.max_rel_err <= tolerance
    return result
