"""Module kinds and the few attributes the structural checks read (type, bias, dropout rate, ...).

The same description is computed from a live model (``module_info``) or read back from a probe
file, so a check never needs more than names and these small dicts.
"""

from __future__ import annotations

from typing import Any

# Type names, so that checks work from a run directory alone (no model at hand).
BATCHNORM = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
             "LazyBatchNorm2d", "LazyBatchNorm3d"}  # fmt: skip
INSTANCENORM = {"InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d",
                "LazyInstanceNorm2d", "LazyInstanceNorm3d"}  # fmt: skip
NORMS = BATCHNORM | INSTANCENORM | {"GroupNorm", "LayerNorm", "RMSNorm", "LocalResponseNorm", "CrossMapLRN2d"}
LRN = {"LocalResponseNorm", "CrossMapLRN2d"}
DROPOUT = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d"}  # variance-changing dropouts
ALPHA_DROPOUT = {"AlphaDropout", "FeatureAlphaDropout"}  # variance-preserving by design
LINEAR_LIKE = {"Linear", "LazyLinear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
               "ConvTranspose2d", "ConvTranspose3d", "LazyConv1d", "LazyConv2d", "LazyConv3d"}  # fmt: skip
RELU_FAMILY = {"ReLU", "ReLU6"}
SEQUENCE = {"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "MultiheadAttention",
            "Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
            "TransformerDecoderLayer"}  # fmt: skip
EMBEDDING = {"Embedding", "EmbeddingBag"}


def is_bn(type_name: str | None) -> bool:
    return type_name in BATCHNORM


def is_norm(type_name: str | None) -> bool:
    return type_name in NORMS


def module_info(module) -> dict[str, Any]:
    """Small JSON-safe description of one module (only what the checks read)."""
    from torch import nn

    info: dict[str, Any] = {"type": type(module).__name__}
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)):
        info["bias"] = getattr(module, "bias", None) is not None
        info["linear_like"] = True
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        info.update(
            bn=True, affine=bool(module.affine), track_running_stats=bool(module.track_running_stats),
            momentum=module.momentum, eps=float(module.eps), num_features=int(module.num_features),
        )  # fmt: skip
    if isinstance(module, nn.modules.dropout._DropoutNd):
        info["p"] = float(module.p)
    if isinstance(module, nn.Hardtanh):
        info["min_val"], info["max_val"] = float(module.min_val), float(module.max_val)
    info["own_params"] = sum(p.numel() for p in module.parameters(recurse=False))
    info["leaf"] = not any(True for _ in module.children())
    return info


def model_modules(model) -> dict[str, dict[str, Any]]:
    return {(name or "<root>"): module_info(m) for name, m in model.named_modules()}
