"""Small onnx / onnxruntime helpers (imported lazily: onnx and onnxruntime are optional)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from normscope.errors import NormscopeError


def require(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise NormscopeError(
            f"{name} is not installed: install the ONNX extra (pip install 'normscope[onnx]')"
        ) from None


def subgraphs(graph: Any) -> Iterator[Any]:
    """The graph and every graph nested in node attributes (If/Loop/Scan bodies)."""
    onnx = require("onnx")
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from subgraphs(g)


def count_ops(model: Any, op_type: str = "BatchNormalization") -> int:
    """Nodes of ``op_type`` in the main graph, nested graphs and local functions."""
    n = sum(1 for g in subgraphs(model.graph) for node in g.node if node.op_type == op_type)
    n += sum(1 for f in model.functions for node in f.node if node.op_type == op_type)
    return n


def session(path: str) -> Any:
    """An onnxruntime CPU session with every graph optimisation disabled: what runs is exactly
    the graph in the file (a runtime that does not fuse)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise NormscopeError(f"onnxruntime cannot load {path}: {' '.join(str(exc).split())[:200]}") from None


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def random_feeds(sess: Any, seed: int = 0, dim: int = 1) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes (symbolic dimensions set to ``dim``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else dim for d in inp.shape]
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise NormscopeError(f"input '{inp.name}' has type {inp.type}, which normscope cannot generate")
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def compare_arrays(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
    """max |Δ| and max |Δ| / max |ref| over all outputs, in float64."""
    import torch

    from normscope.fold.api import compare

    res = compare(
        [torch.from_numpy(np.asarray(r, dtype=np.float64)) for r in reference],
        [torch.from_numpy(np.asarray(c, dtype=np.float64)) for c in candidate],
    )
    return res.max_abs, res.max_rel


@contextlib.contextmanager
def quiet_export() -> Iterator[list]:
    """Silence the exporter's warnings, prints and log lines (e.g. 'torchvision is not
    installed'); yields the list of recorded warnings."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("always")
            yield caught
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
