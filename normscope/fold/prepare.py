"""Before a module's weights are rewritten: make sure what the forward uses *is* the stored
weight, or refuse by name.

- ``torch.nn.utils.parametrize`` (``register_parametrization``, ``parametrizations.weight_norm``,
  ``parametrizations.spectral_norm`` …): the weight is recomputed from the parametrisation at every
  forward; it is materialised (``remove_parametrizations(..., leave_parametrized=True)``, exact:
  the current value) and the fold goes into that tensor.
- ``torch.nn.utils.prune``: ``weight = weight_orig * weight_mask`` is recomputed by a forward
  pre-hook; materialised with ``prune.remove``.
- the old hook-based ``weight_norm``/``spectral_norm``: materialised with their ``remove_*``.
- any other forward hook or pre-hook (on the module, or global): refused by name, since it sees or
  changes what the fold changes.

Only modules that are about to be folded are touched (on the private copy unless inplace=True).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _hook_name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _global_hooks() -> list[str]:
    from torch.nn.modules import module as m

    found = []
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        found += [_hook_name(h) for h in getattr(m, attr, {}).values()]
    return found


def hook_refusal(mod: nn.Module, name: str) -> Optional[str]:
    """Why ``mod`` cannot be folded because of hooks that are not a weight reparametrisation."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    glob = _global_hooks()
    if glob:
        return (
            f"a global module forward hook is registered ({glob[0]}): it sees every layer's output, "
            "which folding changes; remove it before folding"
        )
    for h in mod._forward_pre_hooks.values():
        if not isinstance(h, (prune.BasePruningMethod, WeightNorm, SpectralNorm)):
            return (
                f"'{name}' has a forward pre-hook ({_hook_name(h)}) that may change its input: "
                "remove the hook before folding"
            )
    for h in mod._forward_hooks.values():
        return (
            f"'{name}' has a forward hook ({_hook_name(h)}) that sees or changes its output, which "
            "folding changes: remove the hook before folding"
        )
    return None


def materialize(mod: nn.Module) -> list[str]:
    """Turn parametrised/pruned/weight-normed tensors of ``mod`` into plain parameters holding
    their current value; returns what was dropped (for the report)."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    dropped = []
    if parametrize.is_parametrized(mod):
        # remove_parametrizations deletes the property from the module's class, which a deep
        # copy shares with the original: give this module a class of its own first
        cls = type(mod)
        mod.__class__ = type(
            cls.__name__, cls.__bases__, {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        )
        for tname in list(mod.parametrizations.keys()):
            with torch.no_grad():
                parametrize.remove_parametrizations(mod, tname, leave_parametrized=True)
            dropped.append(f"parametrization of {tname}")
    for _key, h in list(mod._forward_pre_hooks.items()):
        if isinstance(h, prune.BasePruningMethod):
            prune.remove(mod, h._tensor_name)
            dropped.append(f"pruning of {h._tensor_name}")
        elif isinstance(h, WeightNorm):
            torch.nn.utils.remove_weight_norm(mod, h.name)
            dropped.append(f"weight_norm of {h.name}")
        elif isinstance(h, SpectralNorm):
            torch.nn.utils.remove_spectral_norm(mod, h.name)
            dropped.append(f"spectral_norm of {h.name}")
    return dropped


__all__ = ["hook_refusal", "materialize"]
