"""Which modules to hook, and how to read their outputs (channel axis, saturation, histogram)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from normscope.collect.reducers import HistSpec, SatSpec
from normscope.errors import NormscopeError

Selector = Union[str, type]

from normscope.roles import ACTIVATIONS, DROPOUTS, NORMS  # noqa: E402  (one home for roles)

# Modules whose outputs put channels on axis 1 (N, C, ...).
CHANNEL_FIRST: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout, nn.Upsample, nn.PixelShuffle,
)  # fmt: skip
# Modules that keep the layout of their input (activations, dropout): inherit the producer's axis.
LAYOUT_PRESERVING: tuple[type, ...] = ACTIVATIONS + (nn.Dropout, nn.AlphaDropout, nn.Identity)


@dataclass
class HookPlan:
    name: str
    module: nn.Module
    type_name: str
    hist: HistSpec
    sat: SatSpec | None
    record_input: bool  # normalisation layers: statistics of their input as well
    axis_override: int | None
    channel_first: bool
    preserves_layout: bool


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


def is_default_target(module: nn.Module) -> bool:
    """Leaf modules with parameters, modules with their own parameters, activations, norms, dropout."""
    if isinstance(module, ACTIVATIONS + NORMS + DROPOUTS):
        return True
    has_own = any(True for _ in module.parameters(recurse=False))
    is_leaf = not any(True for _ in module.children())
    if has_own:
        return True
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


def plan_hooks(
    model: nn.Module,
    include: Iterable[Selector] | Selector | None = None,
    exclude: Iterable[Selector] | Selector | None = None,
    channel_axis: dict[str, int] | None = None,
) -> list[HookPlan]:
    if not isinstance(model, nn.Module):
        raise NormscopeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}.")
    inc, exc = _as_list(include), _as_list(exclude)
    axes = dict(channel_axis or {})
    plans = []
    for name, module in model.named_modules():
        if inc:
            chosen = _matches(name, module, inc)
        else:
            # the root counts only when it is itself a leaf (watch(nn.Linear(...)))
            is_root_leaf = name == "" and not any(True for _ in module.children())
            chosen = (name != "" or is_root_leaf) and is_default_target(module)
        if not chosen or (exc and _matches(name, module, exc)):
            continue
        hist, sat = hist_and_sat(module)
        override = next((ax for pat, ax in axes.items() if fnmatch.fnmatchcase(name, pat)), None)
        plans.append(
            HookPlan(
                name=name or "<root>",
                module=module,
                type_name=type(module).__name__,
                hist=hist,
                sat=sat,
                record_input=isinstance(module, NORMS),
                axis_override=override,
                channel_first=isinstance(module, CHANNEL_FIRST),
                preserves_layout=isinstance(module, LAYOUT_PRESERVING),
            )
        )
    if not plans:
        raise NormscopeError(
            "watch() selected no module to hook: check include/exclude (name globs like 'layer1.*' "
            "or module types like torch.nn.Conv2d)."
        )
    return plans


def resolve_axis(plan: HookPlan, t: torch.Tensor, inherited: int | None) -> int:
    """Channel axis of an output: override > producer's axis > module kind > rank heuristic."""
    nd = t.dim()
    if nd <= 1:
        return -1 if nd == 1 else 0
    if plan.axis_override is not None:
        return plan.axis_override
    if plan.channel_first:
        return 1
    if plan.preserves_layout and inherited is not None:
        return inherited
    if nd >= 4 and plan.preserves_layout:
        return 1  # activations on images follow a conv/BN
    return -1  # Linear, attention, embeddings, LayerNorm, sequence outputs
