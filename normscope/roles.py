"""What a module *is*, in one place: its role (activation, normalisation, dropout) and family.

Every layer reads this module: the collector (which modules to hook, whose input to record,
which outputs saturate), the checks (which layers can have dead units, which are BatchNorm)
and the report and TensorBoard export (which rows get a dead fraction). Two views of the same
facts are kept side by side:

- module classes (:data:`ACTIVATIONS`, :data:`NORMS`, :data:`DROPOUTS`) for a live model;
- type names (:data:`BATCHNORM`, :data:`NORM_TYPES`, ...) for a run directory read back
  without the model (``meta.json`` stores each module's type name and :func:`family`).

Importing this module costs only torch (already imported by anything that has a model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# --- type names: what a run directory knows without the model ---------------------------------
BATCHNORM = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
                       "LazyBatchNorm2d", "LazyBatchNorm3d"})  # fmt: skip
INSTANCENORM = frozenset({"InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d",
                          "LazyInstanceNorm2d", "LazyInstanceNorm3d"})  # fmt: skip
LRN = frozenset({"LocalResponseNorm", "CrossMapLRN2d"})
NORM_TYPES = BATCHNORM | INSTANCENORM | LRN | {"GroupNorm", "LayerNorm", "RMSNorm"}
DROPOUT = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d"})  # variance-changing dropouts
ALPHA_DROPOUT = frozenset({"AlphaDropout", "FeatureAlphaDropout"})  # variance-preserving by design
LINEAR_LIKE = frozenset({"Linear", "LazyLinear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
                         "ConvTranspose2d", "ConvTranspose3d", "LazyConv1d", "LazyConv2d", "LazyConv3d"})  # fmt: skip
SEQUENCE = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "MultiheadAttention",
                      "Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
                      "TransformerDecoderLayer"})  # fmt: skip
EMBEDDING = frozenset({"Embedding", "EmbeddingBag"})

# Activation families. "relu": outputs ≥ 0 with a zero gradient below 0, so a unit can die
# (ReLU, ReLU6, and Hardtanh clipped at 0 from below). "sigmoid"/"tanh"/"bounded": saturate.
RELU = "relu"
SIGMOID = "sigmoid"
TANH = "tanh"
BOUNDED = "bounded"  # hardtanh-like: flat outside [lo, hi]
RELU_TYPES = frozenset({"ReLU", "ReLU6"})


def is_bn(type_name: str | None) -> bool:
    return type_name in BATCHNORM


def is_norm(type_name: str | None) -> bool:
    return type_name in NORM_TYPES


# --- module classes: what a live model tells -----------------------------------------------------
def _classes():
    from torch import nn

    activations = (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
        nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
        nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.GLU,
        nn.Softmax, nn.LogSoftmax, nn.Hardshrink, nn.Softshrink,
    )  # fmt: skip
    norms = tuple(
        t
        for t in (
            nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm,
            nn.GroupNorm,
            nn.LayerNorm,
            nn.LocalResponseNorm,
            getattr(nn, "RMSNorm", None),
        )  # fmt: skip
        if t is not None
    )
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    return activations, norms, dropouts


ACTIVATIONS, NORMS, DROPOUTS = _classes()


def role(module: Any) -> str | None:
    """ "activation", "norm", "dropout" or None for a live module."""
    if isinstance(module, NORMS):
        return "norm"
    if isinstance(module, ACTIVATIONS):
        return "activation"
    if isinstance(module, DROPOUTS):
        return "dropout"
    return None


def family(module: Any) -> str | None:
    """The activation family of a live module (see :data:`RELU`), or None."""
    from torch import nn

    if isinstance(module, nn.Sigmoid):
        return SIGMOID
    if isinstance(module, nn.Tanh):
        return TANH
    if isinstance(module, nn.ReLU):
        return RELU
    if isinstance(module, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return RELU if float(module.min_val) == 0.0 else BOUNDED
    if isinstance(module, nn.Hardsigmoid):
        return BOUNDED
    return None


def family_of(info: Mapping[str, Any]) -> str | None:
    """The family recorded in a module description (``meta.json`` modules, ``module_info``).

    Runs written before the family was recorded fall back to the type name (and Hardtanh's
    bounds when known).
    """
    if "family" in info:
        return info["family"]
    t = info.get("type")
    if t in RELU_TYPES or (t == "Hardtanh" and info.get("min_val") == 0.0):
        return RELU
    return {"Sigmoid": SIGMOID, "Tanh": TANH}.get(t or "")


def relu_layers(modules: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Names of the ReLU-family modules (the units dead-units judges) in a ``{name: info}`` map."""
    return {name for name, info in modules.items() if family_of(info) == RELU}
