"""Module kinds and the few attributes the structural checks read (type, bias, dropout rate, ...).

The same description is computed from a live model (``module_info``) or read back from a probe
file, so a check never needs more than names and these small dicts.
"""

from __future__ import annotations

from typing import Any

from normscope.roles import family, own_parameters, role, type_name, weight_norm


def module_info(module) -> dict[str, Any]:
    """Small JSON-safe description of one module (only what the checks read)."""
    from torch import nn

    info: dict[str, Any] = {"type": type_name(module)}  # ParametrizedLinear (weight_norm) is a Linear
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
    fam = family(module)
    if fam is not None:
        info["family"] = fam
    r = role(module)
    if r is not None:
        info["role"] = r
    wn = weight_norm(module)
    if wn:
        info["weight_norm"] = wn
    info["own_params"] = sum(p.numel() for p in own_parameters(module))
    info["leaf"] = not any(True for _ in module.children())
    return info


def model_modules(model) -> dict[str, dict[str, Any]]:
    return {(name or "<root>"): module_info(m) for name, m in model.named_modules()}
