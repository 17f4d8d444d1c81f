"""Data-dependent initialisation of weight-normalised layers (Salimans & Kingma 2016, §3).

With w = g·v/‖v‖ a layer's output scale is g's. Initialised from one batch, layer by layer in the
order the forward runs them, each output unit's pre-activation t gets mean 0 and std 1:
g ← g/σ(t) and b ← (b − μ(t))/σ(t), which is the paper's g = 1/σ, b = −μ/σ for t = v·x/‖v‖.
Works for ``torch.nn.utils.parametrizations.weight_norm`` and the legacy ``weight_norm``, on
Linear and Conv layers normalised per output unit (``dim=0``, the default) or as a whole
(``dim=None``: one g, the statistics over every output value).
"""

from __future__ import annotations

from typing import Any

from normscope.errors import NormscopeError


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _g_and_bias(module, wn: dict):
    if wn["api"] == "parametrizations":
        g = getattr(module.parametrizations, wn["tensor"]).original0
    else:
        g = getattr(module, wn["g"])
    return g, getattr(module, "bias", None) if wn["tensor"] == "weight" else None


def weight_norm_data_init(model, batch: Any, eps: float = 1e-6) -> dict[str, dict]:
    """Set g (and the bias) of every weight-normalised layer of ``model`` from one ``batch`` (a tensor,
    a tuple of positional inputs or a dict of keyword inputs) so that its output has mean 0 and std 1 per
    unit. Layers are set one at a time in execution order (each one sees the already initialised layers
    before it). Returns ``{layer: {"std_before", "std_after"}}``. The model's mode and grad state are
    restored; call it once, before training (and before ``normscope.watch``)."""
    import torch
    from torch import nn

    from normscope.roles import weight_norm

    if not isinstance(model, nn.Module):
        raise NormscopeError(f"weight_norm_data_init needs a torch.nn.Module, got {type(model).__name__}.")
    layers = {name: (m, wns) for name, m in model.named_modules() if (wns := weight_norm(m))}
    if not layers:
        raise NormscopeError(
            "weight_norm_data_init found no weight-normalised layer: wrap layers with "
            "torch.nn.utils.parametrizations.weight_norm first."
        )
    for name, (m, wns) in layers.items():
        for wn in wns:
            if wn["tensor"] != "weight" or not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                raise NormscopeError(f"weight_norm_data_init supports Linear/Conv weights, not {name}.{wn['tensor']}.")
            if isinstance(m, nn.modules.conv._ConvTransposeNd) or wn["dim"] not in (0, None):
                raise NormscopeError(
                    f"weight_norm_data_init needs g per output unit (dim=0) or one g (dim=None); {name} has "
                    f"dim={wn['dim']} on a {type(m).__name__}."
                )
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n)) for n, (m, _) in layers.items()]
    was_training = model.training
    model.eval()  # dropout off: the statistics of the pre-activations themselves
    out: dict[str, dict] = {}
    try:
        with torch.no_grad():
            _call(model, batch)
            for h in hooks:
                h.remove()
            hooks = []
            for name in dict.fromkeys(order):
                m, (wn,) = layers[name]
                seen: dict = {}

                def grab(_m, _i, o, seen=seen):
                    seen.setdefault("out", o.detach())

                h = m.register_forward_hook(grab)
                try:
                    _call(model, batch)
                finally:
                    h.remove()
                y = seen["out"].double()
                if wn["dim"] is None:
                    mu, sd = y.mean(), y.std()
                else:
                    axis = 1 if isinstance(m, nn.modules.conv._ConvNd) else y.dim() - 1
                    yc = y.movedim(axis, 0).reshape(y.shape[axis], -1)
                    mu, sd = yc.mean(1), yc.std(1)
                sd = sd.clamp_min(eps)
                g, b = _g_and_bias(m, wn)
                g.div_(sd.to(g.dtype).reshape(g.shape))
                if b is not None:
                    b.sub_(mu.to(b.dtype)).div_(sd.to(b.dtype))
                out[name] = {"std_before": float(y.std())}
            seen_all: dict = {}  # what each layer gives now, all of them initialised: one forward
            hooks = [layers[n][0].register_forward_hook(lambda _m, _i, o, n=n: seen_all.setdefault(n, o.detach()))
                     for n in out]  # fmt: skip
            _call(model, batch)
            for name in out:
                out[name]["std_after"] = float(seen_all[name].double().std())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out
