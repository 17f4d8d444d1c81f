"""Run metadata and small host-side helpers of the collector."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from normscope.store.writer import FORMAT


def initial_meta(model, name: str, plans, options: dict) -> dict:
    """meta.json at the start of a run: model summary, options, histogram edges, versions."""
    from normscope._version import __version__
    from normscope.collect.select import canonical_names, canonical_param_name
    from normscope.roles import family, own_parameters, role, type_name, weight_norm

    hooked = {p.name for p in plans}
    roles = {p.name: p.role for p in plans}
    names = canonical_names(model)
    by_name: dict[str, dict] = {}  # canonical name → entry; a wrapper and the model it wraps share "<root>"
    for raw, m in model.named_modules():
        cname = names[raw] or "<root>"
        entry = {
            "name": cname, "type": type_name(m),
            "params": sum(p.numel() for p in own_parameters(m)),
            "trainable": sum(p.numel() for p in own_parameters(m) if p.requires_grad),
            "hooked": cname in hooked,
        }  # fmt: skip
        if raw != names[raw]:
            entry["raw"] = raw or "<root>"  # the name as the wrapped model spells it
        r = roles.get(cname) if cname in roles else role(m, cname)
        if r is not None:
            entry["role"] = r
        fam = family(m)
        if fam is not None:
            entry["family"] = fam
        wn = weight_norm(m)
        if wn:
            entry["weight_norm"] = wn
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # what bn-momentum reads without the model
            entry.update(bn=True, momentum=m.momentum, track_running_stats=bool(m.track_running_stats))
        by_name.pop(cname, None)
        by_name[cname] = entry
    modules = list(by_name.values())
    init_rms = {}  # what a weight started at: a ratio to a norm that starts at zero means nothing
    try:
        # sharded (DTensor) parameters: their full RMS needs a collective, and only rank 0 gets here;
        # the checks fall back to the first recorded step for them
        plain = [(raw, p.detach()) for raw, p in model.named_parameters() if p.numel() and not hasattr(p, "to_local")]
        if plain:
            with torch.no_grad():  # one fused norm and one host transfer for all of them
                norms = _to_host([n.reshape(1).double() for n in torch._foreach_norm([p for _, p in plain])]).tolist()
            for (raw, p), n in zip(plain, norms):
                init_rms[canonical_param_name(raw, names)] = n / p.numel() ** 0.5
    except Exception:  # noqa: BLE001 - sharded or lazy parameters: the checks fall back to the first step
        init_rms = {}
    total = sum(p.numel() for p in model.parameters())
    # the storage precision of every parameter not in float32 (what rounds an update away)
    dtypes = {canonical_param_name(raw, names): str(p.dtype).removeprefix("torch.")
              for raw, p in model.named_parameters() if p.dtype != torch.float32}  # fmt: skip
    return {
        "format": FORMAT,
        "name": name,
        "status": "running",
        "created": _now(),
        "writer": {"pid": os.getpid(), "host": socket.gethostname()},  # a reader tells a dead writer by these
        "heartbeat": _now(),  # refreshed at every flush
        "versions": {
            "normscope": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "class": type_name(model),
            "params": total,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "hooked_layers": len(plans),
        },
        "modules": modules,
        "param_init_rms": init_rms,
        "param_dtypes": dtypes,
        "execution_order": [],
        "options": options,
        "histograms": {p.name: p.hist.to_json() for p in plans},
        "saturation": {p.name: p.sat.kind for p in plans if p.sat is not None},
        "threads": torch.get_num_threads(),
        "steps_recorded": 0,
    }


def _to_host(tensors: list[torch.Tensor]) -> np.ndarray:
    """Concatenate per device and copy to the host: one transfer per device per step."""
    by_dev: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_dev[t.device].append(i)
    if len(by_dev) == 1:
        return torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy()
    pieces: list[np.ndarray | None] = [None] * len(tensors)
    for _dev, idx in by_dev.items():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().numpy()
        o = 0
        for i in idx:
            n = tensors[i].numel()
            pieces[i] = flat[o : o + n]
            o += n
    return np.concatenate(pieces)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sel_json(sel) -> list[str] | None:
    if sel is None:
        return None
    if isinstance(sel, (str, type)):
        sel = [sel]
    return [s if isinstance(s, str) else f"type:{s.__module__}.{s.__qualname__}" for s in sel]
