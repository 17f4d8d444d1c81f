"""Parametrised layers (weight normalisation, Salimans & Kingma 2016): which submodules compute a
weight rather than being layers, and how their trainable tensors are named and read."""

from __future__ import annotations

import re
from typing import Any


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
