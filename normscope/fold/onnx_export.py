"""``export_onnx``: fold, export with torch.onnx (dynamo exporter, TorchScript fallback) and
verify the file with onnxruntime (optimisations disabled) against the unfolded model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from normscope.errors import NormscopeError
from normscope.fold.api import _check_model, _run, _to_double, as_inputs, clone_model, fold_bn
from normscope.fold.graph import one_line
from normscope.fold.onnx_util import compare_arrays, count_ops, quiet_export, require, session
from normscope.fold.results import ExportResult, FoldResult

_EXPORTERS = ("auto", "dynamo", "torchscript")


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _export(
    model: nn.Module, inputs: tuple, path: Path, exporter: str, opset: Optional[int]
) -> tuple[str, Optional[str], list[str]]:
    """Export with the requested exporter; "auto" falls back to TorchScript when dynamo fails.
    Returns (exporter used, dynamo error that caused a fallback, notes)."""
    dynamo_error, notes = None, []
    if exporter in ("auto", "dynamo"):
        try:
            with quiet_export():
                torch.onnx.export(
                    model,
                    inputs,
                    str(path),
                    dynamo=True,
                    verbose=False,
                    opset_version=opset,
                    external_data=_param_bytes(model) > 1_800_000_000,
                )
            return "dynamo", None, notes
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            dynamo_error = one_line(exc)
            if exporter == "dynamo":
                raise NormscopeError(
                    f"the dynamo ONNX exporter failed: {dynamo_error}; try exporter='torchscript'"
                ) from None
    try:
        with quiet_export() as caught:
            torch.onnx.export(
                model, inputs, str(path), dynamo=False, opset_version=opset or 17, do_constant_folding=True
            )
        if any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
            notes.append(
                "TorchScript tracing turned Python values into constants (TracerWarning): the file is "
                "only valid for inputs that take the same branches and shapes as the example"
            )
    except Exception as exc:  # noqa: BLE001
        extra = f" (dynamo exporter: {dynamo_error})" if dynamo_error else ""
        raise NormscopeError(f"ONNX export failed: {one_line(exc)}{extra}") from None
    return "torchscript", dynamo_error, notes


def run_onnx(path: str, inputs: tuple) -> list[np.ndarray]:
    """Run the file with onnxruntime (no graph optimisation) on the tensor example inputs."""
    sess = session(path)
    arrays = [x.detach().cpu().numpy() for x in inputs if isinstance(x, Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(arrays):
        raise NormscopeError(f"{path} takes {len(names)} inputs but {len(arrays)} example tensors were given")
    return sess.run(None, dict(zip(names, arrays)))


class VerificationError(NormscopeError):
    """The exported file does not match the unfolded model within the tolerance."""


def _discard(path: Path) -> None:
    for p in (path, Path(str(path) + ".data")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    fold: bool = True,
    verify: bool = True,
    *,
    exporter: str = "auto",
    opset: Optional[int] = None,
    tolerance: float = 1e-4,
    zero_padding: str = "add",
    force: bool = False,
) -> ExportResult:
    """Fold (optional), export to ``path``, count BatchNormalization nodes left, and (optional)
    run the file with onnxruntime, graph optimisations disabled, against the *unfolded*
    PyTorch model evaluated in float64. ``verified`` is max relative error ≤ ``tolerance``.

    Verification gates: a file that fails it is not written (``VerificationError``, a
    ``NormscopeError``), unless ``force=True``, which writes it with ``verified=False``."""
    _check_model(model)
    inputs = as_inputs(example_inputs)
    if exporter not in _EXPORTERS:
        raise NormscopeError(f"exporter must be one of {', '.join(_EXPORTERS)}, got {exporter!r}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise NormscopeError(f"the model is in training mode ({training[0]}): call model.eval() before exporting")
    path = Path(path)
    if not path.parent.exists():
        raise NormscopeError(f"the folder {path.parent} does not exist: create it or choose another output path")
    onnx = require("onnx")
    if verify:
        require("onnxruntime")
    fold_result: Optional[FoldResult] = None
    to_export = model
    reference = None
    if fold:
        fold_result = fold_bn(model, inputs, zero_padding=zero_padding, verify=verify)
        to_export = fold_result.model
        reference = getattr(fold_result, "reference_outputs", None)
    external = _param_bytes(to_export) > 1_800_000_000
    target = path if (external or not verify) else path.with_name(f".{path.name}.normscope-unverified")
    start = time.perf_counter()
    try:
        used, dynamo_error, notes = _export(to_export, inputs, target, exporter, opset)
    except BaseException:
        if target != path:
            _discard(target)
        raise
    seconds = time.perf_counter() - start
    try:
        proto = onnx.load(str(target), load_external_data=False)
        result = ExportResult(
            str(path),
            used,
            count_ops(proto),
            tolerance=tolerance,
            fold=fold_result,
            export_seconds=seconds,
            exporter_error=dynamo_error,
            notes=notes,
        )
        if verify:
            if reference is None:
                reference = _run(clone_model(model).double(), _to_double(inputs))
            got = [g for g in run_onnx(str(target), inputs) if np.issubdtype(np.asarray(g).dtype, np.floating)]
            if len(got) != len(reference):
                raise VerificationError(
                    f"the ONNX file returns {len(got)} outputs, the model {len(reference)}: "
                    f"nothing written to {path}; pass force=True (--force) to keep it anyway"
                )
            result.max_abs_err, result.max_rel_err = compare_arrays([r.cpu().numpy() for r in reference], got)
            result.verified = result.max_rel_err <= tolerance
            if not result.verified and not force:
                raise VerificationError(
                    f"the ONNX file does not match the unfolded model (max relative error {result.max_rel_err:.3g} > "
                    f"tolerance {tolerance:g}, onnxruntime without optimisation): nothing written to {path}; "
                    "pass force=True (--force) to write it anyway"
                )
            if not result.verified:
                result.notes.append(
                    f"written although verification failed (force=True): max relative error "
                    f"{result.max_rel_err:.3g} > tolerance {tolerance:g}"
                )
    except BaseException:
        _discard(target)
        raise
    if target != path:
        target.replace(path)
    return result
