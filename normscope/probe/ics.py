"""Exact internal covariate shift (Santurkar et al. 2018, Definition 2.1), opt-in.

For layer i with parameters W_i (all of the layer's own parameters, flattened together):

    G  = ∇_{W_i} L(W_1ᵗ, …, W_kᵗ)
    G′ = ∇_{W_i} L(W_1ᵗ⁺¹, …, W_{i−1}ᵗ⁺¹, W_iᵗ, …, W_kᵗ)

on the same batch, where Wᵗ⁺¹ is one optimizer step from Wᵗ with the full gradient. Reports
‖G − G′‖₂ and cos∠(G, G′). Costs one forward+backward per measured layer; the model is never
modified (every evaluation runs on a copy, with the same RNG seed so dropout masks match).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from normscope.errors import NormscopeError
from normscope.probe import measure as M


def parametrised_layers(model: nn.Module, x: Any) -> list[str]:
    """Modules with their own trainable parameters, in execution order of one forward (on a copy)."""
    m = copy.deepcopy(model)
    owners = {
        mod: name for name, mod in m.named_modules() if any(p.requires_grad for p in mod.parameters(recurse=False))
    }
    order: list[str] = []
    hs = [mod.register_forward_hook(lambda mod, a, o: order.append(owners[mod]) if owners[mod] not in order else None)
          for mod in owners]  # fmt: skip
    try:
        with torch.no_grad():
            M.forward(m, x)
    finally:
        for h in hs:
            h.remove()
    rest = [n for n in owners.values() if n not in order]  # parameters used outside forward hooks
    return order + rest


def _own(model: nn.Module, layer: str) -> list[nn.Parameter]:
    mod = model.get_submodule(layer) if layer else model
    return [p for p in mod.parameters(recurse=False) if p.requires_grad]


def _grads(model: nn.Module, loss_fn, x, y, seed: int) -> nn.Module:
    model.zero_grad(set_to_none=True)
    with M.fork_rng(seed):
        loss = loss_fn(M.forward(model, x), y)
    loss.backward()
    return model


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double() for p in params]
    )


def measure_ics(model: nn.Module, loss_fn: Callable, batch, optimizer: float | Callable | None = None,
                layers: Iterable[str] | None = None, seed: int = 0):  # fmt: skip
    """Per layer ‖G − G′‖₂ and cos∠(G, G′) (Santurkar et al. 2018, Def. 2.1) → DataFrame.

    ``batch``: an ``(inputs, targets)`` pair. ``optimizer``: a learning rate for plain SGD
    (default 0.01), or a factory ``params → torch.optim.Optimizer`` (its first step is used).
    ``layers``: module names to measure (default: every module with own trainable parameters,
    in execution order). Columns: order, layer, numel, g_norm, g_prime_norm, diff_norm, cos.
    """
    import pandas as pd

    if not isinstance(model, nn.Module):
        raise NormscopeError(f"measure_ics() needs an nn.Module, got {type(model).__name__}.")
    x, y = M.split_batch(batch)
    dev = M.device_of(model)
    x, y = M.to_device(x, dev), M.to_device(y, dev)
    if optimizer is None:
        optimizer = 0.01
    if isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool):
        lr = float(optimizer)
        factory = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    elif callable(optimizer):
        factory = optimizer
    else:
        raise NormscopeError(
            f"optimizer must be a learning rate or a factory params → optimizer, got {type(optimizer).__name__}."
        )
    order = parametrised_layers(model, x)
    if layers is None:
        chosen = list(order)
    else:
        chosen = list(layers)
        unknown = [l for l in chosen if l not in order]
        if unknown:
            raise NormscopeError(
                f"measure_ics: {', '.join(map(repr, unknown))} have no trainable parameters of their own; choose from {', '.join(order)}."
            )
    # Wᵗ and G (full gradient at Wᵗ)
    net_t = _grads(copy.deepcopy(model), loss_fn, x, y, seed)
    g_full = {l: _flat(_own(net_t, l)) for l in order}
    # Wᵗ⁺¹: one optimizer step from Wᵗ with that gradient
    net_next = _grads(copy.deepcopy(model), loss_fn, x, y, seed)
    opt = factory(net_next.parameters())
    opt.step()
    rows = []
    for l in chosen:
        i = order.index(l)
        net = copy.deepcopy(model)
        with torch.no_grad():
            for prev in order[:i]:
                for p, q in zip(_own(net, prev), _own(net_next, prev)):
                    p.copy_(q)
        _grads(net, loss_fn, x, y, seed)
        g, gp = g_full[l], _flat(_own(net, l))
        gn, gpn = float(g.norm()), float(gp.norm())
        cos = float(torch.dot(g, gp) / (gn * gpn)) if gn > 0 and gpn > 0 else float("nan")
        rows.append({"order": i, "layer": l, "numel": int(g.numel()), "g_norm": gn, "g_prime_norm": gpn,
                     "diff_norm": float((g - gp).norm()), "cos": cos})  # fmt: skip
    return pd.DataFrame(rows, columns=["order", "layer", "numel", "g_norm", "g_prime_norm", "diff_norm", "cos"])
