"""BN folding for deployment: exact where provable, refused with a reason elsewhere, verified.

- :func:`fold_bn` → :class:`FoldResult`
- :func:`export_onnx` → :class:`ExportResult`; :func:`fold_onnx` → :class:`OnnxFoldResult`
- :func:`recalibrate_bn` → :class:`RecalibrationResult`

Importing this package loads only torch: onnx, onnxruntime, typer and rich are imported inside
the functions that need them. See docs/fold.md.
"""

from normscope.fold.api import fold_bn
from normscope.fold.onnx_export import VerificationError, export_onnx
from normscope.fold.onnx_fold import fold_onnx
from normscope.fold.recalibrate import recalibrate_bn
from normscope.fold.results import (
    ExportResult,
    FoldedPair,
    FoldResult,
    Fp16Risk,
    OnnxFoldResult,
    OutputError,
    RecalibrationResult,
    SkippedBN,
)
from normscope.fold.rewrite import ChannelAdd

__all__ = [
    "ChannelAdd",
    "ExportResult",
    "FoldResult",
    "FoldedPair",
    "Fp16Risk",
    "OnnxFoldResult",
    "OutputError",
    "RecalibrationResult",
    "SkippedBN",
    "VerificationError",
    "export_onnx",
    "fold_bn",
    "fold_onnx",
    "recalibrate_bn",
]
