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

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
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


# --- attention blocks and transformer blocks ------------------------------------------------------
# (query child, key child) names of attention modules with separate projections: BERT/RoBERTa
# (query/key), Llama/Qwen2/Mistral/ViT/Swin in transformers ≥ 5 (q_proj/k_proj), T5 (q/k)
QK_CHILDREN = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"))
# QK-norm children (Qwen3, OLMo2, Gemma 3, ViT-22B-style models): applied to q and k before the logits
QK_NORM_CHILDREN = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"),
                    ("norm_q", "norm_k"))  # fmt: skip
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv")


@dataclass(frozen=True)
class AttentionSpec:
    """How to read queries and keys of one attention module.

    ``kind``: ``"mha"`` (``nn.MultiheadAttention``: q and k recomputed from its inputs with its
    in-projection), ``"separate"`` (q and k are the outputs of two Linear-like children) or
    ``"fused"`` (one child's output holds q, k and v side by side: GPT-2's ``c_attn``).
    ``q`` / ``k``: (child name, first column, end column) of the child output holding them
    (None for "mha"). ``scale``: the factor the module applies to q·k (1/√head_dim, T5's 1, GPT-2's
    1/(√d·(layer+1)) with ``scale_attn_by_inverse_layer_idx``). ``causal``: the module declares
    causal self-attention (``is_causal``).
    """

    kind: str
    q: tuple[str, int, int] | None
    k: tuple[str, int, int] | None
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    batch_first: bool = True
    qk_norm: tuple[str, str] | None = None

    def as_json(self) -> dict:
        return {"kind": self.kind, "q": self.q[0] if self.q else None, "k": self.k[0] if self.k else None,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "scale": self.scale,
                "causal": self.causal, "qk_norm": list(self.qk_norm) if self.qk_norm else None}  # fmt: skip


def _out_features(m) -> int | None:
    n = getattr(m, "out_features", None)
    if isinstance(n, int):
        return n
    nf = getattr(m, "nf", None)  # transformers' Conv1D (GPT-2): weight is (in, out)
    if isinstance(nf, int):
        return nf
    w = getattr(m, "weight", None)
    return int(w.shape[0]) if w is not None and hasattr(w, "dim") and w.dim() == 2 else None


def _int_attr(module, names) -> int | None:
    for a in names:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    cfg = getattr(module, "config", None)
    for a in names:
        v = getattr(cfg, a, None) if cfg is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _scale(module, head_dim: int) -> float:
    s = getattr(module, "scaling", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0:
        return float(s)
    if hasattr(module, "key_value_proj_dim"):  # T5 (before transformers 5 had `scaling`): no 1/√d
        return 1.0
    return head_dim**-0.5


def attention_spec(module: Any) -> AttentionSpec | None:
    """How ``module`` computes attention logits, or None when it is not an attention module.

    Recognised: ``nn.MultiheadAttention`` (fused ``in_proj_weight``, or separate q/k/v weights
    when ``kdim != embed_dim``); modules with Linear-like query and key children named as in
    :data:`QK_CHILDREN` and a head count or head size attribute (``num_heads``,
    ``num_attention_heads``, ``n_head``, ``n_heads``, ``head_dim``, ``attention_head_size``,
    ``key_value_proj_dim``; also read from ``module.config``); GPT-2's fused ``c_attn`` (its
    output split into q, k, v; cross-attention reads q from ``q_attn``). Grouped-query attention:
    the key heads are ``k_out / head_dim`` (``num_key_value_heads``), each serving
    ``heads / kv_heads`` query heads.
    """
    from torch import nn

    if isinstance(module, nn.MultiheadAttention):
        e, h = int(module.embed_dim), int(module.num_heads)
        d = e // h
        return AttentionSpec("mha", None, None, h, h, d, d**-0.5, False, bool(module.batch_first))
    children = dict(module.named_children())
    if not children:
        return None
    heads = _int_attr(module, _HEAD_ATTRS)
    hd = _int_attr(module, _HEAD_DIM_ATTRS)
    c_attn = children.get("c_attn")
    if c_attn is not None and _out_features(c_attn) and heads:  # GPT-2
        e = int(getattr(module, "split_size", None) or getattr(module, "embed_dim", 0) or _out_features(c_attn) // 3)
        d = hd or e // heads
        causal = getattr(module, "is_causal", None) is True
        if "q_attn" in children and getattr(module, "is_cross_attention", False):
            return AttentionSpec("separate", ("q_attn", 0, e), ("c_attn", 0, e), heads, heads, d, _scale(module, d),
                                 False)  # fmt: skip
        if _out_features(c_attn) == 3 * e:
            return AttentionSpec("fused", ("c_attn", 0, e), ("c_attn", e, 2 * e), heads, heads, d, _scale(module, d),
                                 causal)  # fmt: skip
    for qn, kn in QK_CHILDREN:
        q, k = children.get(qn), children.get(kn)
        if q is None or k is None or isinstance(q, nn.MultiheadAttention):
            continue
        qo, ko = _out_features(q), _out_features(k)
        if not qo or not ko or not (heads or hd):
            continue
        d = hd or qo // heads
        if qo % d or ko % d or (qo // d) % (ko // d):
            continue
        qkn = next(((a, b) for a, b in QK_NORM_CHILDREN if a in children and b in children), None)
        return AttentionSpec("separate", (qn, 0, qo), (kn, 0, ko), qo // d, ko // d, d, _scale(module, d),
                             getattr(module, "is_causal", None) is True, qk_norm=qkn)  # fmt: skip
    return None


def attention_modules(model: Any) -> dict[str, AttentionSpec]:
    """``{raw name: spec}`` of every attention module of ``model`` (see :func:`attention_spec`)."""
    out = {}
    for name, m in model.named_modules():
        s = attention_spec(m)
        if s is not None:
            out[name] = s
    return out


def transformer_blocks(model: Any, attention: Mapping[str, Any] | None = None) -> list[str]:
    """Raw names of the transformer blocks: the residual stream is their output.

    A block is an element of a ``ModuleList`` / ``Sequential`` whose elements all have the same
    class and each contain an attention module (BERT's ``encoder.layer``, GPT-2's ``h``, Llama's
    ``layers``, T5's ``block``, ViT's and ``nn.TransformerEncoder``'s ``layers``, Swin's ``blocks``);
    when such lists nest (Swin's stages holding block lists), the innermost level is taken.
    """
    from torch import nn

    attn = set(attention if attention is not None else attention_modules(model))
    cands = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if not kids or len({module_class(c) for _, c in kids}) != 1:
            continue
        full = [f"{name}.{k}" if name else k for k, _ in kids]
        if all(any(a.startswith(f + ".") for a in attn) for f in full):
            cands += full
    return [c for c in cands if not any(o != c and o.startswith(c + ".") for o in cands)]


# --- weight normalisation (Salimans & Kingma 2016): w = g · v / ‖v‖ ------------------------------
def is_parametrization_path(name: str) -> bool:
    """A module inside ``<layer>.parametrizations`` (the ParametrizationList computing a weight and
    its ``_WeightNorm``/``_SpectralNorm`` members): weight computations, not layers."""
    return name == "parametrizations" or name.startswith("parametrizations.") or ".parametrizations" in f".{name}"


def parametrized_param_leaf(leaf_path: str) -> str | None:
    """``parametrizations.<t>.original`` → ``<t>_original``, ``...original<k>`` → ``<t>_original<k>``:
    a parametrised layer's trainable tensors named on the layer itself (so that the layer of a
    parameter stays everything before its last dot); None for any other path."""
    m = re.fullmatch(r"parametrizations\.([A-Za-z_]\w*)\.(original\d*)", leaf_path)
    return f"{m.group(1)}_{m.group(2)}" if m else None


def weight_norm(module: Any) -> list[dict]:
    """The weight-normalised tensors of a live module, each ``{"tensor", "api", "dim", "g", "v"}``
    (``g``/``v``: the parameter names on the module, canonical form, see
    :func:`parametrized_param_leaf`): ``torch.nn.utils.parametrizations.weight_norm`` (``api``
    "parametrizations": ``original0`` is g, ``original1`` is v) and the legacy hook-based
    ``torch.nn.utils.weight_norm`` (``api`` "legacy": ``weight_g``, ``weight_v``). ``dim`` is the
    dimension g keeps (0: one g per output unit; None: one g for the whole tensor)."""
    out = []
    plist = getattr(module, "parametrizations", None)
    if plist is not None:
        for tname in list(plist.keys()):
            ps = plist[tname]
            if len(ps) == 1 and type(ps[0]).__name__ == "_WeightNorm" and hasattr(ps, "original0"):
                dim = getattr(ps[0], "dim", 0)
                out.append({"tensor": tname, "api": "parametrizations", "dim": None if dim == -1 else int(dim),
                            "g": f"{tname}_original0", "v": f"{tname}_original1"})  # fmt: skip
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        if type(hook).__name__ == "WeightNorm" and type(hook).__module__ == "torch.nn.utils.weight_norm":
            dim = getattr(hook, "dim", 0)
            out.append({"tensor": hook.name, "api": "legacy", "dim": None if dim == -1 else int(dim),
                        "g": f"{hook.name}_g", "v": f"{hook.name}_v"})  # fmt: skip
    return out


# --- where a repeated block normalises: pre-LN or post-LN (Xiong et al. 2020) --------------------
def block_of(layer: str) -> str:
    """The repeated block a layer belongs to: its name up to the first numeric part ("model.layers.3",
    a Sequential's "4"); a layer outside any numbered container is its own block ("lm_head")."""
    parts = layer.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def numbered_prefixes(layer: str) -> list[str]:
    """Every container of ``layer`` that ends in a numeric part, outermost first ("1", "1.layers.0")."""
    parts = layer.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts) - 1) if parts[i].isdigit()]


def norm_placement(order: list[Mapping[str, Any]], modules: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Per repeated block, where its normalisation sits, from the recorded execution order
    (``meta.json`` ``execution_order``: the hooked modules in the order their forwards ended).

    A block is any numbered container holding two or more hooked modules ("bert.encoder.layer.3",
    "1.layers.0", T5's "encoder.block.0.layer.1" inside "encoder.block.0"); containers among the
    hooked modules (they end after their children) are left out of its sequence. Its placement:

    - ``"pre"``: the first module the block runs (dropouts aside) is a norm — each branch normalises
      the residual stream on entry (GPT-2, Llama, T5, ViT, Swin; ``norm_first=True``);
    - ``"post"``: the block's last module is a norm and its first is not — the norm follows the
      residual sum (the original Transformer, BERT; ``TransformerEncoderLayer(norm_first=False)``);
    - ``"both"``: first and last are norms (sandwich norms); ``None``: no norm at either end.

    Returns ``{block: {"placement", "first", "last", "norms", "stack"}}`` in execution order;
    ``stack`` is the container the block repeats in ("bert.encoder.layer").
    """
    seen: dict[str, list[str]] = {}
    for r in order:
        if int(r.get("call", 0)) != 0:
            continue
        layer = r["layer"]
        for b in numbered_prefixes(layer):
            if layer not in seen.setdefault(b, []):
                seen[b].append(layer)
    out = {}
    for b, layers in seen.items():
        leaves = [x for x in layers if not any(y.startswith(x + ".") for y in layers)]
        if len(leaves) < 2:
            continue

        def info(x):
            return modules.get(x, {})

        def norm(x):
            return is_norm_info(info(x))

        body = [x for x in leaves if info(x).get("role") != "dropout"] or leaves
        first_norm, last_norm = norm(body[0]), norm(leaves[-1])
        placement = ("both" if first_norm and last_norm else "pre" if first_norm else "post" if last_norm
                     else None)  # fmt: skip
        out[b] = {"placement": placement, "first": body[0], "last": leaves[-1],
                  "norms": [x for x in leaves if norm(x)], "stack": b.rpartition(".")[0]}  # fmt: skip
    return out


def block_stacks(placement: Mapping[str, Mapping[str, Any]], kind: str | None = None) -> dict[str, list[str]]:
    """Stacks of repeated blocks (``{stack: [block, ...]}`` in execution order, two blocks or more),
    from :func:`norm_placement`; with ``kind``, only blocks of that placement, and the innermost
    stacks only (a numbered container of whole stacks is not itself judged)."""
    stacks: dict[str, list[str]] = {}
    for b, v in placement.items():
        if kind is None or v["placement"] == kind:
            stacks.setdefault(v["stack"], []).append(b)
    stacks = {k: v for k, v in stacks.items() if len(v) >= 2}
    inner = {k: v for k, v in stacks.items()
             if not any(o != k and any(ob.startswith(b + ".") for b in v for ob in ov) for o, ov in stacks.items())}  # fmt: skip
    return inner
