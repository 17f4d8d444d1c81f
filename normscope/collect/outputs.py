"""Finding the floating-point tensors in whatever a module returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

_MAX_DEPTH = 4


def iter_float_tensors(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every floating tensor in a tensor, tuple, list, dict or dataclass.

    Paths are "" for a bare tensor, else dotted indices/keys ("0", "1.h", "logits"). Other
    objects (None, ints, strings, integer tensors) are skipped.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() > 0:
            yield prefix, obj
        return
    if depth >= _MAX_DEPTH:
        return
    if isinstance(obj, dict):  # includes transformers' ModelOutput (an OrderedDict)
        items = obj.items()
    elif isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    else:
        return
    for k, v in items:
        path = f"{prefix}.{k}" if prefix else str(k)
        yield from iter_float_tensors(v, path, depth + 1)
