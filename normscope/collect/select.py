"""Which modules to hook, and how to read their outputs (channel axis, saturation, histogram).

What a module *is* (activation, normalisation, dropout) comes from :mod:`normscope.roles`; the
channel axis of an output comes from the data: the module's own weight (or normalized_shape)
against the tensor's shape, else the axis of the tensor it consumed, else the tensor's rank.
Layer names are canonical: wrapper prefixes (``_orig_mod.`` from torch.compile, ``module.`` from
DDP/DataParallel, FSDP's and checkpoint wrappers') are stripped, so a model wrapped or not gives
the same names. FSDP2 (``fully_shard``) keeps the module tree and only swaps each sharded
module's class for a generated ``FSDP<Name>`` subclass: names are unchanged and type names are
the user's (:func:`normscope.roles.type_name`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from normscope import roles as ROLES
from normscope.collect.reducers import HistSpec, SatSpec
from normscope.errors import NormscopeError

Selector = Union[str, type]

# Modules whose outputs put channels on axis 1 (N, C, ...) whatever their parameters say.
CHANNEL_FIRST: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout, nn.Upsample, nn.PixelShuffle,
)  # fmt: skip
# Modules whose output features are the last axis.
CHANNEL_LAST: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)

# Name components that wrappers insert: private, so never a user's own submodule name.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module")
_WRAPPER_RE = re.compile(r"(^|\.)(" + "|".join(_WRAPPER_PARTS) + r")(?=\.|$)")


def _root_prefixes(model: nn.Module) -> list[str]:
    """Attribute chain of the wrappers around the real model (``module`` of DDP, ``_orig_mod``...)."""
    out = []
    m = model
    for _ in range(8):
        cls = type(m).__name__
        if cls in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(m, "module", None), nn.Module):
            out.append("module")
            m = m.module
        elif isinstance(getattr(m, "_orig_mod", None), nn.Module):
            out.append("_orig_mod")
            m = m._orig_mod
        elif isinstance(getattr(m, "_fsdp_wrapped_module", None), nn.Module):
            out.append("_fsdp_wrapped_module")
            m = m._fsdp_wrapped_module
        else:
            break
    return out


def canonical_names(model: nn.Module) -> dict[str, str]:
    """raw ``named_modules()`` name → canonical name (wrapper prefixes stripped; the real root is "")."""
    prefixes = _root_prefixes(model)
    root = ".".join(prefixes)
    out = {}
    for raw, _ in model.named_modules():
        name = raw
        if root and (name == root or name.startswith(root + ".")):
            name = name[len(root) + 1 :] if name != root else ""
        name = _WRAPPER_RE.sub(lambda m: m.group(1), name).strip(".")
        name = re.sub(r"\.{2,}", ".", name)
        out[raw] = name
    return out


def canonical_param_name(raw: str, names: Mapping[str, str]) -> str:
    """A parameter's name with the canonical name of its module."""
    mod, _, leaf = raw.rpartition(".")
    if ".parametrizations." in f".{raw}":  # a parametrised layer's originals, named on the layer itself
        head, _, tail = f".{raw}".rpartition(".parametrizations.")
        pleaf = ROLES.parametrized_param_leaf(f"parametrizations.{tail}")
        if pleaf is not None:
            mod, leaf = head[1:], pleaf
    cmod = names.get(mod, mod)
    return f"{cmod}.{leaf}" if cmod else leaf


@dataclass
class HookPlan:
    name: str  # canonical
    module: nn.Module
    type_name: str
    hist: HistSpec
    sat: SatSpec | None
    record_input: bool  # normalisation layers: statistics of their input as well
    axis_override: int | None
    channel_first: bool  # channels on axis 1 whatever the shape says (conv, BN, channels-first norms)
    channel_last: bool  # features on the last axis (Linear, Embedding, last-axis norms)
    features: int | None  # channel count the module's own parameters declare
    preserves_layout: bool  # activations, dropout, identity: the producer's axis carries over
    role: str | None = None
    raw_name: str = ""


def _matches(name: str, module: nn.Module, selectors: Sequence[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(sel, type):
            if isinstance(module, sel):
                return True
        else:
            raise NormscopeError(f"include/exclude entries must be name globs (str) or module types, got {sel!r}.")
    return False


def is_default_target(module: nn.Module, role: str | None = None) -> bool:
    """Activations, norms and dropout (by role); modules with their own parameters; leaves with parameters."""
    if role is not None:
        return True
    if any(True for _ in module.parameters(recurse=False)):
        return True
    if getattr(module, "parametrizations", None) is not None:
        return True  # a parametrised layer (weight_norm): its weight lives in .parametrizations
    is_leaf = not any(True for _ in module.children())
    return is_leaf and any(True for _ in module.parameters())


def hist_and_sat(module: nn.Module) -> tuple[HistSpec, SatSpec | None]:
    if isinstance(module, nn.Sigmoid):
        return HistSpec("linear", 0.0, 1.0), SatSpec("sigmoid")
    if isinstance(module, nn.Tanh):
        return HistSpec("linear", -1.0, 1.0), SatSpec("tanh")
    if isinstance(module, nn.Hardtanh):  # includes ReLU6
        lo, hi = float(module.min_val), float(module.max_val)
        return HistSpec("linear", lo, hi), SatSpec("bounds", lo, hi)
    if isinstance(module, nn.Hardsigmoid):
        return HistSpec("linear", 0.0, 1.0), SatSpec("bounds", 0.0, 1.0)
    return HistSpec("symlog"), None


def _as_list(x: Iterable[Selector] | Selector | None) -> list[Selector]:
    if x is None:
        return []
    if isinstance(x, (str, type)):
        return [x]
    return list(x)


def _layout_rule(module: nn.Module, role: str | None) -> tuple[bool, bool, int | None, bool]:
    """(channel_first, channel_last, features, preserves_layout) for a module."""
    if role == "norm":
        cf = ROLES.channels_first_norm(module)
        return cf is True, cf is False, ROLES.feature_size(module), False
    if isinstance(module, CHANNEL_FIRST):
        return True, False, None, False
    if isinstance(module, CHANNEL_LAST):
        return False, True, None, False
    if role in ("activation", "dropout") or isinstance(module, nn.Identity):
        return False, False, None, True
    return False, False, ROLES.feature_size(module), False


def plan_hooks(
    model: nn.Module,
    include: Iterable[Selector] | Selector | None = None,
    exclude: Iterable[Selector] | Selector | None = None,
    channel_axis: dict[str, int] | None = None,
    roles: Mapping | None = None,
) -> list[HookPlan]:
    if not isinstance(model, nn.Module):
        raise NormscopeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}.")
    inc, exc = _as_list(include), _as_list(exclude)
    axes = dict(channel_axis or {})
    user_roles = ROLES.check_roles(roles)
    names = canonical_names(model)
    plans = []
    for raw, module in model.named_modules():
        name = names[raw]
        if inc:
            chosen = _matches(name, module, inc)
        else:
            # the root counts only when it is itself a leaf (watch(nn.Linear(...)))
            is_root_leaf = name == "" and not any(True for _ in module.children())
            role = ROLES.role(module, name, user_roles)
            chosen = (name != "" or is_root_leaf) and is_default_target(module, role) and not _is_wrapper(module)
        if not chosen or (exc and _matches(name, module, exc)) or ROLES.is_parametrization_path(name):
            continue
        role = ROLES.role(module, name, user_roles)
        hist, sat = hist_and_sat(module)
        override = next((ax for pat, ax in axes.items() if fnmatch.fnmatchcase(name, pat)), None)
        cf, cl, feats, keep = _layout_rule(module, role)
        plans.append(
            HookPlan(
                name=name or "<root>",
                module=module,
                type_name=ROLES.type_name(module),
                hist=hist,
                sat=sat,
                record_input=role == "norm",
                axis_override=override,
                channel_first=cf,
                channel_last=cl,
                features=feats,
                preserves_layout=keep,
                role=role,
                raw_name=raw,
            )  # fmt: skip
        )
    if not plans:
        raise NormscopeError(
            "watch() selected no module to hook: check include/exclude (name globs like 'layer1.*' "
            "or module types like torch.nn.Conv2d)."
        )
    return plans


def _is_wrapper(module: nn.Module) -> bool:
    """Wrapper modules (checkpoint wrappers, compiled wrappers) hold no parameter of their own."""
    return ROLES.type_name(module) in ("CheckpointWrapper", "OptimizedModule", "OffloadWrapper")


def resolve_axis(plan: HookPlan, t: torch.Tensor, inherited: int | None) -> int:
    """Channel axis of an output, from the data.

    Order: the user's override; the module kind (conv/BN: 1, Linear: last); the module's own
    feature count against the tensor's axes (a norm's weight, a block's layer-scale vector);
    the axis of the tensor it consumed (activations, dropout, shape-preserving blocks); the rank
    (N×C×H×W images: 1; sequences and features: last).
    """
    nd = t.dim()
    if nd <= 1:
        return -1 if nd == 1 else 0
    if plan.axis_override is not None:
        return plan.axis_override
    if plan.channel_first:
        return 1
    if plan.channel_last:
        return -1
    c = plan.features
    if c is not None:
        first, last = t.shape[1] == c, t.shape[-1] == c
        if first and not last:
            return 1
        if last and not first:
            return -1
        if first and last and inherited is not None:
            return inherited
    if inherited is not None:
        return inherited
    return 1 if nd >= 4 else -1
