"""Plain result records of folding, export and recalibration (JSON-able via ``to_dict``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from torch import nn

FP16_MAX = 65504.0
TINY_VAR = 1e-6  # a BN channel with running σ² below this is reported as "σ² ≈ 0"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))  # type: ignore[call-overload]


@dataclass
class FoldedPair(_Record):
    """One folded BN call site. ``layer`` absorbed the BN (a producer before it, or a
    consumer after it, see ``role``); ``copy_of`` names the shared module it was copied from."""

    layer: str
    bn: str
    pattern: str
    role: str = "producer"
    site: str = ""
    copy_of: Optional[str] = None
    pre_add: bool = False
    materialized: list[str] = field(default_factory=list)  # parametrisations/pruning dropped first

    @property
    def producer(self) -> str:
        return self.layer


@dataclass
class SkippedBN(_Record):
    bn: str
    reason: str
    site: str = ""


@dataclass
class OutputError(_Record):
    """max |y′ − y| and max |y′ − y| / max |y| over the outputs (float64 unless stated)."""

    max_abs: float
    max_rel: float
    outputs: int = 1
    dtype: str = "float64"


@dataclass
class Fp16Risk(_Record):
    """Magnitudes of one folded layer. ``tiny_var_channels``: BN channels with σ² < 1e-6
    (their scale s = γ/√(σ²+ε) is about γ/√ε). ``exceeds_fp16``: a value above 65504."""

    layer: str
    bn: str
    max_abs_weight: float
    max_abs_bias: float
    max_scale: float
    tiny_var_channels: list[int] = field(default_factory=list)
    max_abs_shift: Optional[float] = None
    exceeds_fp16: bool = False

    @property
    def at_risk(self) -> bool:
        return self.exceeds_fp16 or bool(self.tiny_var_channels)


@dataclass
class FoldResult(_Record):
    """What :func:`fold_bn` did. ``model`` is the folded module (not serialised)."""

    model: nn.Module
    folded: list[FoldedPair]
    skipped: list[SkippedBN]
    error: Optional[OutputError]
    fp16_risk: list[Fp16Risk]
    tracing: str
    untraced: dict[str, str] = field(default_factory=dict)

    @property
    def all_folded(self) -> bool:
        return not self.skipped

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "model":
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):
                out[f.name] = [v.to_dict() for v in value]
            elif isinstance(value, _Record):
                out[f.name] = value.to_dict()
            else:
                out[f.name] = _clean(value)
        out["model_type"] = type(self.model).__name__
        return out

    def __repr__(self) -> str:
        err = "not computed" if self.error is None else f"max rel {self.error.max_rel:.2e}"
        return (
            f"FoldResult(folded={len(self.folded)}, skipped={len(self.skipped)}, tracing={self.tracing!r}, error={err})"
        )


@dataclass
class ExportResult(_Record):
    """What :func:`export_onnx` wrote and how the ONNX output compares with the unfolded model
    (onnxruntime, graph optimisations disabled; reference computed in float64)."""

    path: str
    exporter: str
    bn_nodes_left: int
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    verified: Optional[bool] = None
    tolerance: float = 1e-4
    fold: Optional[FoldResult] = None
    export_seconds: float = 0.0
    exporter_error: Optional[str] = None  # why the dynamo exporter failed, when it fell back
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _clean(getattr(self, f.name)) for f in fields(self) if f.name != "fold"}
        out["fold"] = None if self.fold is None else self.fold.to_dict()
        return out


@dataclass
class OnnxFoldResult(_Record):
    """What :func:`fold_onnx` did to an ONNX file, verified with onnxruntime."""

    path_in: str
    path_out: str
    folded: list[FoldedPair]
    skipped: list[SkippedBN]
    bn_nodes_left: int
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    verified: Optional[bool] = None
    tolerance: float = 1e-4

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _clean(getattr(self, f.name)) for f in fields(self)}
        out["folded"] = [p.to_dict() for p in self.folded]
        out["skipped"] = [p.to_dict() for p in self.skipped]
        return out


@dataclass
class RecalibrationResult(_Record):
    """What :func:`recalibrate_bn` changed. ``reused``: BN modules called more than once per
    forward (statistics pooled over all their calls), with the largest call count seen."""

    bns: list[str]
    batches: int
    samples: int
    skipped: dict[str, str] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    distributed: bool = False
    world_size: int = 1
