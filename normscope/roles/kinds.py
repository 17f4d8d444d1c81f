"""What a single module *is*: its role (activation, normalisation, dropout) and family.

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

import fnmatch
import re
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


def module_class(module: Any) -> type:
    """The user's class of a module: FSDP2's ``fully_shard`` swaps it for a generated subclass
    ``FSDP<Name>(FSDPModule, <Name>)``, which must not change what the module is called."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and cls.__module__.startswith("torch.distributed"):
        for base in cls.__mro__[1:]:
            if base.__name__ == cls.__name__[4:]:
                return base
    if cls.__name__.startswith("Parametrized") and cls.__module__ == "torch.nn.utils.parametrize":
        return cls.__mro__[1]  # register_parametrization's ParametrizedLinear(Linear): still a Linear
    return cls


def type_name(module: Any) -> str:
    """The type name a run directory records for a module (FSDP2's generated subclass unwrapped)."""
    return module_class(module).__name__


def is_bn(type_name: str | None) -> bool:
    return type_name in BATCHNORM


def is_norm(type_name: str | None) -> bool:
    return type_name in NORM_TYPES


def is_norm_info(info: Mapping[str, Any]) -> bool:
    """A normalisation module, from its description (recorded role, else its type name)."""
    return info.get("role") == "norm" or is_norm(info.get("type"))


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


ROLES = ("activation", "norm", "dropout")
# class names that say "activation" for a parameter-free module of another library
_ACT_NAME = re.compile(r"(Activation|GELU|ReLU|SiLU|Swish|Sigmoid|Tanh|Mish|Softplus|Hardswish|ELU)")
_NORM_NAME = re.compile(r"Norm(?!al)")  # LayerNorm, RMSNorm, FrozenBatchNorm2d; not Normal/Normalize
_DROPOUT_NAME = re.compile(r"Dropout")


PARAMETRIZATION_ORIGINS = ("torch.nn.utils.parametrize", "torch.nn.utils.parametrizations")


def _own_params(module) -> list:
    return list(module.parameters(recurse=False))


def own_parameters(module) -> list:
    """A module's own parameters, a parametrised layer's originals (``weight_norm``'s g and v,
    kept in ``module.parametrizations``) included."""
    ps = list(module.parameters(recurse=False))
    plist = getattr(module, "parametrizations", None)
    if plist is not None and hasattr(plist, "parameters"):
        ps += list(plist.parameters())
    return ps


def _is_leaf(module) -> bool:
    return not any(True for _ in module.children())


def role(module: Any, name: str = "", user_roles: Mapping | None = None) -> str | None:
    """ "activation", "norm", "dropout" or None: what ``module`` is, by what it is built from.

    In order: the user's ``roles`` mapping ({module type or name glob: role}); the module's type
    hierarchy (torch's activation, normalisation and dropout classes, and any class defined in
    ``torch.nn.modules.activation`` or ``transformers.activations``); then its class name, for
    leaf modules of other libraries: ``*Norm*`` with at most vector parameters (LlamaRMSNorm,
    T5LayerNorm, ConvNextLayerNorm, FrozenBatchNorm2d with buffers only), and parameter-free
    modules named like an activation (``*GELU*``, ``*SiLU*``, ``*Activation*``, ...) or a dropout.
    """
    if user_roles:
        for key, r in user_roles.items():
            if (isinstance(key, type) and isinstance(module, key)) or (
                isinstance(key, str) and fnmatch.fnmatchcase(name, key)
            ):
                return r
    if isinstance(module, NORMS):
        return "norm"
    if isinstance(module, ACTIVATIONS):
        return "activation"
    if isinstance(module, DROPOUTS):
        return "dropout"
    cls = module_class(module)
    origin = cls.__module__ or ""
    if origin.startswith(PARAMETRIZATION_ORIGINS):
        return None  # _WeightNorm, _SpectralNorm: they compute a weight, they never see an activation
    if origin == "torch.nn.modules.activation" or origin.startswith("transformers.activations"):
        return "activation"
    if not _is_leaf(module):
        return None
    cname = cls.__name__
    params = _own_params(module)
    if _NORM_NAME.search(cname) and all(p.dim() <= 1 for p in params):
        return "norm"
    if params:
        return None
    if _DROPOUT_NAME.search(cname):
        return "dropout"
    if _ACT_NAME.search(cname):
        return "activation"
    return None


def check_roles(user_roles: Mapping | None) -> dict:
    """Validate a ``roles=`` mapping: keys are module types or name globs, values a role."""
    from normscope.errors import NormscopeError

    out = {}
    for key, r in (user_roles or {}).items():
        if not isinstance(key, (str, type)):
            raise NormscopeError(f"roles keys must be module types or name globs, got {key!r}.")
        if r not in ROLES and r is not None:
            raise NormscopeError(f"roles[{key!r}] must be one of {', '.join(ROLES)} (or None), got {r!r}.")
        out[key] = r
    return out


def channels_first_norm(module) -> bool | None:
    """True for a norm that normalises channels on axis 1 (BatchNorm, GroupNorm, InstanceNorm,
    ``data_format="channels_first"`` LayerNorms), False for last-axis norms (LayerNorm, RMSNorm),
    None when the module does not say."""
    from torch import nn

    fmt = getattr(module, "data_format", None)
    if isinstance(fmt, str):
        return fmt.replace("-", "_").lower() in ("channels_first", "nchw", "ncl", "ncdhw")
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
                           nn.LocalResponseNorm)):  # fmt: skip
        return True
    if isinstance(module, NORMS):
        return False  # LayerNorm, RMSNorm: normalised over the trailing dims
    if getattr(module, "running_mean", None) is not None:  # frozen BN: buffers only
        return True
    return None


def feature_size(module) -> int | None:
    """The channel count a module's own parameters (or normalized_shape) declare, if any."""
    ns = getattr(module, "normalized_shape", None)
    if isinstance(ns, (tuple, list)) and len(ns) >= 1 and isinstance(ns[-1], int):
        return int(ns[-1])
    for attr in ("weight", "running_mean", "bias"):
        t = getattr(module, attr, None)
        if t is not None and hasattr(t, "dim") and t.dim() == 1:
            return int(t.numel())
    vec = [p for p in _own_params(module) if p.dim() == 1]
    return int(vec[0].numel()) if len(vec) == 1 else None


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
    if module_class(module).__name__ == "ReLUSquaredActivation":  # transformers: relu(x)², zero gradient below 0
        return RELU
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
