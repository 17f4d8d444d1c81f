"""``fold_onnx``: the same BN folding on an existing ONNX file (for models exported by other
tools), with numpy float64 math, then verified with onnxruntime (optimisations disabled).

Folds Conv, ConvTranspose (with groups), Gemm, MatMul(+Add) → BatchNormalization when the
producer's output has no other consumer and BN is in inference form with constant parameters,
also through Reshape/Flatten nodes that provably keep the feature axis (static shapes from ONNX
shape inference: same size, same product of the axes before it); BatchNormalization → Conv with
all pads 0; and a BN-only branch summed with a Conv branch reading the same input (stride 1,
"same" pads, C_in = C_out) as an identity kernel (RepVGG). MatMul's feature axis is its last.

Both exporters' graphs are read: local functions are inlined first; constants are initializers
(not graph inputs), ``Constant`` nodes, and values computed from those by small pure ops
(``Identity`` routing as the legacy exporter writes for identical parameters, ``Shape``,
``Expand``, ``CastLike``, ``Cast``, ``Reshape``, ``Unsqueeze``, ``Squeeze``, ``Concat``, … as the
dynamo exporter writes for a conv's zero bias). Nodes left without consumers are removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from normscope.errors import NormscopeError
from normscope.fold.onnx_graph import _attr, _cast, _Graph, _reshape_axis, _set_attr
from normscope.fold.onnx_util import compare_arrays, count_ops, random_feeds, require, session
from normscope.fold.results import FoldedPair, OnnxFoldResult, SkippedBN


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
    bn_in = bn.input[0]
    x, tail, consumer, axis, via = bn_in, None, bn, 1, []
    while True:  # back through Reshape/Flatten that keep BN's channel axis
        p = G.producer.get(x)
        if p is None:
            raise ValueError("input is a graph input")
        if not G.only_consumer(x, consumer):
            raise ValueError(f"input '{x}' has other consumers")
        if p.op_type not in ("Reshape", "Flatten"):
            break
        src, dst = G.shape.get(p.input[0]), G.shape.get(x)
        back = (
            None
            if src is None or dst is None
            else next((a for a in range(len(src)) if _reshape_axis(src, dst, a) == axis), None)
        )
        if back is None:
            raise ValueError(
                f"input comes through {p.op_type} '{p.name or x}' that does not provably keep "
                "BN's channel axis (shapes unknown or the axis is split/merged)"
            )
        tail = tail or p
        axis, consumer, x = back, p, p.input[0]
        via.append(p.op_type)
    if via and p.op_type in ("Conv", "ConvTranspose") and axis != 1:
        raise ValueError(f"the {p.op_type} channel axis does not land on BN's axis 1")
    if via and p.op_type in ("Gemm", "Add", "MatMul") and axis != (G.rank.get(x) or 0) - 1:
        raise ValueError(f"the {p.op_type} feature axis (last) does not land on BN's axis 1")
    if p.op_type in ("Conv", "ConvTranspose"):
        w, b = G.const(p, 1), G.const(p, 2)
        if w is None:
            raise ValueError(f"{p.op_type} weight '{p.input[1]}' is not a constant: {G.why_not_const(p.input[1])}")
        if len(p.input) > 2 and p.input[2] and b is None:
            raise ValueError(f"{p.op_type} bias '{p.input[2]}' is not a constant: {G.why_not_const(p.input[2])}")
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
        if not via and G.rank.get(x) != 2:
            raise ValueError(
                f"MatMul output rank is {G.rank.get(x, 'unknown')}: BN's channel axis 1 is "
                "provably its feature axis only for rank 2 (or through a Reshape that keeps it)"
            )
        new_w = _cast(w.astype(np.float64) * s[None, :], w, "weights")
        new_b = None if b is None else _cast(s * b.astype(np.float64).reshape(-1) + t, b, "bias")
        shift = _cast(t, w, "shift") if b is None else None
        _set_input(G, mm, 1, new_w, "")
        if shift is not None and G.rank.get(bn_in) != 2:
            raise ValueError(
                "MatMul without a bias add and a BN input of rank ≠ 2: the shift would not broadcast "
                "on BN's channel axis"
            )
        if shift is not None:  # MatMul alone: the BN node becomes an Add of t
            bn.op_type, bn.domain = "Add", ""
            del bn.attribute[:]
            del bn.output[1:]
            bn.input[:] = [bn_in, G.new_const((bn.name or bn.output[0]) + "_shift", shift)]
            return "MatMul → " + " → ".join([*reversed(via), "BatchNormalization (shift kept as Add)"])
        _set_input(G, p, bias_in, new_b.reshape(-1) if b.ndim <= 1 else new_b.reshape(b.shape[:-1] + (-1,)), "")
        pattern = "MatMul + Add → BatchNormalization"
    else:
        raise ValueError(f"input comes from {p.op_type}, not Conv/ConvTranspose/Gemm/MatMul")
    if via:
        pattern = pattern.replace(" → BatchNormalization", " → " + " → ".join([*reversed(via), "BatchNormalization"]))
    G.rename_output(tail or p, bn.output[0])
    G.drop_info(bn_in)
    return pattern


def _fold_consumer(G: _Graph, bn: Any, s: np.ndarray, t: np.ndarray) -> str:
    y = bn.output[0]
    users = G.consumers.get(y, [])
    if len(users) != 1 or y in G.outputs or y in G.nested:
        raise ValueError(f"output has {len(users)} consumers")
    c = users[0]
    if c.op_type == "Gemm" and c.input[0] == y:
        return _fold_into_gemm(G, bn, c, s, t)
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


def _summands(G: _Graph, add: Any, out: list) -> None:
    for name in add.input:
        p = G.producer.get(name)
        if p is not None and p.op_type == "Add" and G.only_consumer(name, add):
            _summands(G, p, out)
        else:
            out.append(name)


def _fold_reparam(G: _Graph, bn: Any, s: np.ndarray, t: np.ndarray) -> tuple[str, Any]:
    """BN(x) + … + Conv(x) → Conv′(x) (identity kernel); returns (pattern, conv)."""
    y, x = bn.output[0], bn.input[0]
    users = G.consumers.get(y, [])
    if len(users) != 1 or users[0].op_type != "Add" or y in G.outputs or y in G.nested:
        raise ValueError("not a BN-only branch summed by an Add")
    add = users[0]
    top = add
    while True:
        nxt = G.consumers.get(top.output[0], [])
        if (
            len(nxt) == 1
            and nxt[0].op_type == "Add"
            and top.output[0] not in G.outputs
            and top.output[0] not in G.nested
        ):
            top = nxt[0]
        else:
            break
    terms: list = []
    _summands(G, top, terms)
    for name in terms:
        c = G.producer.get(name)
        if c is None or c.op_type != "Conv" or c.input[0] != x or not G.only_consumer(name, G.consumers[name][0]):
            continue
        if G.consumers[name][0].op_type != "Add":
            continue
        w, b = G.const(c, 1), G.const(c, 2)
        if w is None or (len(c.input) > 2 and c.input[2] and b is None) or w.shape[0] != s.size:
            continue
        group = int(_attr(c, "group", 1))
        k = w.shape[2:]
        strides = list(_attr(c, "strides", [1] * len(k)))
        dil = list(_attr(c, "dilations", [1] * len(k)))
        pads = list(_attr(c, "pads", [0] * 2 * len(k)))
        auto_pad = _attr(c, "auto_pad", b"NOTSET")
        if (
            auto_pad not in (b"NOTSET", "NOTSET")
            or any(st != 1 for st in strides)
            or any(kk % 2 == 0 for kk in k)
            or w.shape[1] * group != s.size
            or pads != [(kk - 1) // 2 * d for kk, d in zip(k, dil)] * 2
        ):
            continue
        w64 = w.astype(np.float64).copy()
        o = np.arange(s.size)
        w64[(o, o % w.shape[1], *[np.full_like(o, kk // 2) for kk in k])] += s
        new_b = (0.0 if b is None else b.astype(np.float64)) + t
        new_w, new_b = _cast(w64, w, "weights"), _cast(new_b, w if b is None else b, "bias")
        _set_input(G, c, 1, new_w, "")
        _set_input(G, c, 2, new_b, (c.name or c.output[0]) + "_bias")
        other = add.input[1] if add.input[0] == y else add.input[0]
        add.op_type = "Identity"
        add.input[:] = [other]
        return "BatchNormalization identity branch + Conv branch → Conv (identity kernel)", c
    raise ValueError("summed with no Conv branch that reads the same input with stride 1, 'same' pads and C_in = C_out")


def _fold_into_gemm(G: _Graph, bn: Any, c: Any, s: np.ndarray, t: np.ndarray) -> str:
    """BN → Gemm(A = BN(x)): alpha·(s·x + t)·B′ + beta·C = alpha·x·(diag(s)·B′) + (beta·C + alpha·t·B′)."""
    if int(_attr(c, "transA", 0)) or G.rank.get(bn.output[0]) != 2:
        raise ValueError("output goes to a Gemm that transposes A or is not rank 2")
    bm, cc = G.const(c, 1), G.const(c, 2)
    if bm is None or (len(c.input) > 2 and c.input[2] and cc is None):
        raise ValueError("Gemm B or C is not constant")
    trans_b, alpha, beta = int(_attr(c, "transB", 0)), float(_attr(c, "alpha", 1.0)), float(_attr(c, "beta", 1.0))
    b64 = bm.astype(np.float64)
    bk = b64.T if trans_b else b64  # (K, N)
    if bk.shape[0] != s.size:
        raise ValueError(f"Gemm reads {bk.shape[0]} features, BN has {s.size}")
    new_bk = bk * s[:, None]
    new_c = (0.0 if cc is None else beta * cc.astype(np.float64)) + alpha * (t @ bk)
    new_b = _cast(new_bk.T if trans_b else new_bk, bm, "weights")
    new_c = _cast(
        np.broadcast_to(new_c, np.broadcast_shapes(np.shape(new_c), (bk.shape[1],))).copy(),
        bm if cc is None else cc,
        "bias",
    )
    _set_input(G, c, 1, new_b, "")
    _set_input(G, c, 2, new_c, (c.name or c.output[0]) + "_C")
    _set_attr(c, "beta", 1.0)
    c.input[0] = bn.input[0]
    G.drop_info(bn.output[0])
    return "BatchNormalization → Gemm"


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
            try:
                pattern, layer = _fold_reparam(G, bn, s, t)
                role = "reparam"
            except ValueError as why_rep:
                return None, f"input: {why_in}; output: {why_out}; branch: {why_rep}"
        G.g.node.remove(bn)
    layer_name = (layer.name or layer.output[0]) if layer is not None else "?"
    return FoldedPair(layer=layer_name, bn=name, pattern=pattern, role=role), ""


def fold_onnx(
    path_in: str | Path,
    path_out: str | Path,
    verify: bool = True,
    *,
    tolerance: float = 1e-4,
    seed: int = 0,
    force: bool = False,
) -> OnnxFoldResult:
    """Fold BatchNormalization nodes of ``path_in`` into neighbouring Conv/ConvTranspose/Gemm/
    MatMul nodes; write ``path_out``; verify outputs on random inputs of the declared shapes
    (onnxruntime, optimisations off). A file that fails verification is removed again and
    ``VerificationError`` raised, unless ``force=True``."""
    onnx = require("onnx")
    path_in, path_out = Path(path_in), Path(path_out)
    if not path_in.is_file():
        raise NormscopeError(f"{path_in} does not exist: pass the path of an .onnx file")
    try:
        model = onnx.load(str(path_in))
    except Exception as exc:  # noqa: BLE001
        raise NormscopeError(f"{path_in} is not a readable ONNX file: {' '.join(str(exc).split())[:160]}") from None
    if len(model.functions):  # exporters may write modules as local functions: inline them (exact)
        from onnx import inliner

        model = inliner.inline_local_functions(model)
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
        if not result.verified and not force:
            from normscope.fold.onnx_export import VerificationError

            Path(path_out).unlink(missing_ok=True)
            raise VerificationError(
                f"the folded file does not match {path_in} (max relative error "
                f"{result.max_rel_err:.3g} > tolerance {tolerance:g}): {path_out} not written; "
                "pass force=True to keep it anyway"
            )
    return result
