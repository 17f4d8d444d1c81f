"""Gradient flow along depth, shared by vanishing-gradients and exploding-gradients.

Two measures, both independent of tensor size and pooling (per-element RMS is not: a layer before
global average pooling over H×W positions gets 1/(H·W) of the head's per-element gradient by
construction, and a class-token head touches one position of many):

- :func:`weight_profile` (vanishing): the relative weight gradient ρ_l = ‖∇W_l‖ / ‖W_l‖ of each
  conv/linear weight, in execution order, as the median per repeated block (:func:`block_of`). ∇W sums over positions, so pooling's 1/(H·W) cancels
  against the H·W positions it sums; ρ is what a step of SGD changes relative to the weight.
- :func:`output_profile` (exploding): the whole-tensor norm of the gradient w.r.t. each
  parametrised layer's output (not per element), whose growth towards the input is the backward
  gain > 1 of Pascanu et al. (2013) — it grows geometrically in a deep network with too large an
  initialisation, while ρ can stay balanced (activations shrink towards the input as fast).

Both compare the two ends of the network: the median over the first ``L/8`` layers (at least
one) against the median over the last ``L/8``. Weights initialised at or near zero (a zero-init
head or layer scale, RMS below 1e-4 at the first recorded step) are left out of ρ: their ratio to
a norm that starts at zero says nothing about gradient flow. So are the layers such a weight gates: a
layer whose output reaches the loss only through a layer whose weight started near zero (a LoRA
adapter's A before its zero-init B, a conv before a zero-init BatchNorm γ) gets ∇W proportional to
that weight, so its ρ follows the gate's growth, not depth. The per-layer factor of a Theil–Sen
fit (median pairwise slope of log(value) along depth) is reported beside it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from normscope.analyze.quantities import first_output_rms
from normscope.analyze.registry import SkipCheck
from normscope.roles import BATCHNORM, EMBEDDING, block_of, is_norm_info


def _window(df, window_frac: float):
    steps = np.sort(df.step.unique())
    w = max(1, int(np.ceil(window_frac * len(steps))))
    return df[df.step >= steps[-w]], [int(steps[-w]), int(steps[-1])]


NEAR_ZERO_RMS = 1e-4


def ends_ratio(values) -> tuple[float, int]:
    """Median of the first ``L/8`` layers over the median of the last ``L/8`` (at least one each)."""
    v = np.asarray(values, dtype=np.float64)
    k = max(1, len(v) // 8)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmedian(v[:k]) / np.nanmedian(v[-k:])), k


def initial_rms(ctx) -> dict[str, float]:
    """RMS of each parameter when the run started (meta.json ``param_init_rms``), or, for runs
    without that record (sharded parameters), at the first recorded step."""
    init = ctx.meta.get("param_init_rms")
    if init:
        return {k: float(v) for k, v in init.items() if v is not None}
    p = ctx.params_all
    if not len(p):
        return {}
    first = p[p.step == p.step.min()]
    rms = first.norm.to_numpy(float) / np.sqrt(np.maximum(first.numel.to_numpy(float), 1))
    return dict(zip(first.param, rms.tolist()))


def near_zero_init(ctx) -> set[str]:
    """Parameters initialised at (or near) zero: RMS below 1e-4 when the run started (meta.json), or,
    for runs without that record, a first recorded norm equal to the first update's within 1e-3
    (a weight that started at 0 ends its first step with w = −Δw, so ‖w‖ = ‖Δw‖)."""
    rms = initial_rms(ctx)
    near = {k for k, v in rms.items() if v < NEAR_ZERO_RMS}
    if ctx.meta.get("param_init_rms"):
        return near
    p = ctx.params_all
    if not len(p):
        return near
    first = p[p.step == p.step.min()]
    upd, norm = first.update_norm.to_numpy(float), first.norm.to_numpy(float)
    moved_from_zero = np.isfinite(upd) & (upd > 0) & (np.abs(norm - upd) <= 1e-3 * norm)
    return near | set(first.param[moved_from_zero])


def _next_layers(g, node_id: str, parametrised) -> tuple[set[str], bool]:
    """The parametrised layers first met on the paths out of ``node_id`` (through parameter-free
    modules and functional ops), and whether a path reaches the output without meeting one."""
    found: set[str] = set()
    bare = False
    seen: set[str] = set()
    todo = deque(g.succs.get(node_id, []))
    while todo:
        n = g.nodes[todo.popleft()]
        if n.id in seen:
            continue
        seen.add(n.id)
        if parametrised(n):
            found.add(n.module)
        elif n.op == "output":
            bare = True
        else:
            todo.extend(g.succs.get(n.id, []))
    return found, bare


def _kin(layer: str, gate: str) -> bool:
    """``gate`` sits in ``layer``'s parent or grandparent module (not the root): a LoRA pair
    (``q.lora_A`` / ``q.lora_B``; PEFT's ``q.lora_A.default`` / ``q.lora_B.default``), a conv and its BN."""
    a, b = layer.split("."), gate.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common >= 1 and common >= len(a) - 2


def _silent_at_start(ctx):
    """layer → whether its output was ~0 at the first recorded step (RMS ≤ 1e-3 × the median output RMS
    of the layers recorded then): a gate multiplies by ~0 (LoRA's B = 0, a BatchNorm with γ = 0), a
    norm written as x·(1 + w) with w = 0 (Gemma) passes the signal. A layer without rows: a
    conv/linear or BatchNorm is taken as silent, any other kind not."""
    rms = first_output_rms(ctx.train)
    ref = float(np.median(list(rms.values()))) if rms else float("nan")

    def silent(layer: str) -> bool:
        if layer in rms and np.isfinite(ref) and ref > 0:
            return rms[layer] <= 1e-3 * ref
        t = str(ctx.type_of(layer) or "")
        return "Conv" in t or "Linear" in t or t in BATCHNORM

    return silent


def gated_by_near_zero_init(ctx, zero: set[str]) -> dict[str, str]:
    """{layer: gate} for layers whose output enters, on every path, a layer whose weight started near
    zero (``zero``) with more layers after it: ∂L/∂h of such a layer is multiplied by that weight,
    so its ρ measures the gate's growth, not depth — a LoRA adapter's A before its zero-init B, a
    conv before a zero-init BatchNorm γ. A zero-init head gates every layer alike and is no gate."""
    near = {p.rsplit(".", 1)[0] for p in zero if p.endswith(".weight") and "." in p}
    g = ctx.graph if near else None
    if g is None:
        return {}

    def parametrised(n) -> bool:
        return n.op == "module" and ctx.modules.get(n.module, {}).get("own_params", 0) > 0

    silent = _silent_at_start(ctx)
    gates = {n.module for n in g.module_nodes()
             if n.module in near and silent(n.module) and _next_layers(g, n.id, parametrised)[0]}  # fmt: skip
    chain = g.source == "execution-order"  # consecutive layers, not data flow: a gate must be the layer's own
    out: dict[str, str] = {}
    open_layers: set[str] = set()
    for node in g.module_nodes():
        if not parametrised(node) or node.module in gates or node.module in open_layers:
            continue
        found, bare = _next_layers(g, node.id, parametrised)
        if found and not bare and found <= gates and not (chain and not all(_kin(node.module, f) for f in found)):
            out.setdefault(node.module, min(found))
        else:
            open_layers.add(node.module)  # every call of a layer must be gated
            out.pop(node.module, None)
    return out


def trend_ratio(values) -> tuple[float, float]:
    """(first/last along the fitted trend, factor per layer towards the output) by Theil–Sen on log values."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(v) & (v > 0))
    if len(idx) < 2:
        return float("nan"), float("nan")
    y = np.log(v[idx])
    i, j = np.triu_indices(len(idx), 1)
    slope = float(np.median((y[j] - y[i]) / (idx[j] - idx[i])))
    return float(np.exp(-slope * (idx[-1] - idx[0]))), float(np.exp(slope))


def weight_profile(ctx, window_frac: float) -> dict:
    """ρ_l = ‖∇W_l‖/‖W_l‖ per conv/linear weight along depth (median over the window)."""
    p = ctx.params
    if not len(p):
        raise SkipCheck("no parameter statistics in the run")
    keep = []
    zero = near_zero_init(ctx)
    gated = gated_by_near_zero_init(ctx, zero)
    left = (
        f"; left out: {len(gated)} layers gated by a weight that started near zero ({min(gated)}, …)" if gated else ""
    )
    for name in p.param.unique():
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        if name in zero or layer in gated:
            continue
        info = ctx.modules.get(layer or "<root>", {})
        # a weight-normalised layer's direction v stands for its weight (w = g·v/‖v‖: ρ_v = ρ of w's direction)
        wn_v = {f"{layer}.{w['v']}" if layer else w["v"] for w in info.get("weight_norm") or ()}
        if (not name.endswith("weight") and name not in wn_v) or is_norm_info(info) or info.get("type") in EMBEDDING:
            continue
        keep.append((ctx.order(layer or "<root>"), name, layer))
    keep.sort()
    if len(keep) < 2:
        raise SkipCheck(f"fewer than two conv/linear weights with recorded statistics{left}")
    win, span = _window(p[p.param.isin([k[1] for k in keep])], window_frac)
    rho, names, layers = [], [], []
    for _, name, layer in keep:
        d = win[win.param == name]
        n, g = d.norm.to_numpy(float), d.grad_norm.to_numpy(float)
        ok = (n > 1e-12) & np.isfinite(g)  # a weight at exactly zero has no relative gradient
        if not ok.any():
            continue
        rho.append(float(np.median(g[ok] / n[ok])))
        names.append(name)
        layers.append(layer)
    if len(rho) < 2:
        raise SkipCheck(f"fewer than two conv/linear weights with a recorded gradient and non-zero norm{left}")
    # depth is counted in blocks: the weights of one repeated block (a transformer layer's q/k/v/o and
    # MLP, a ResNet stage) are one position, judged by their median — attention's q/k projections learn
    # slowly at initialisation in every healthy transformer, which is not depth
    groups: dict[str, list[float]] = {}
    for lay, r in zip(layers, rho):
        groups.setdefault(block_of(lay), []).append(r)
    gvals = [float(np.median(v)) for v in groups.values()]
    ratio, k = ends_ratio(gvals)
    _, rate = trend_ratio(gvals)
    return {"measure": "relative weight gradient ‖∇W‖/‖W‖", "params": names, "layers": layers,
            "values": rho, "ratio": ratio, "group": k, "window_steps": span, "rate_per_layer": rate,
            "blocks": [{"block": b, "median": g} for b, g in zip(groups, gvals)],
            "left_out_near_zero_init": sorted(zero),
            "left_out_gated": [{"layer": k, "gate": v} for k, v in sorted(gated.items())]}  # fmt: skip


def output_profile(ctx, window_frac: float) -> dict:
    """‖∂L/∂h_l‖ (whole tensor) per parametrised layer output along depth (median over the window)."""
    g = ctx.grads
    g = g[g.output == ""]
    pairs = []
    for layer, call in ctx.layer_calls(g):
        info = ctx.modules.get(layer, {})
        if info.get("own_params", 0) > 0 and not is_norm_info(info) and info.get("type") not in EMBEDDING:
            pairs.append((layer, call))
    if len(pairs) < 2:
        raise SkipCheck("fewer than two parametrised layers with recorded output gradients")
    win, span = _window(g, window_frac)
    med = []
    for layer, call in pairs:
        d = win[(win.layer == layer) & (win.call == call)]
        med.append(float(np.nanmedian(d.norm.to_numpy(float))) if len(d) else float("nan"))
    med = np.asarray(med)
    ratio, k = ends_ratio(med)
    _, rate = trend_ratio(med)
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = (med[:-1] / med[1:]).tolist()
    return {"measure": "output-gradient norm ‖∂L/∂h‖", "layers": [p[0] for p in pairs], "calls": [p[1] for p in pairs],
            "values": med.tolist(), "ratio": ratio, "group": k, "window_steps": span, "backward_gain": gains,
            "rate_per_layer": rate}  # fmt: skip


def evidence(prof: dict, t) -> dict:
    ev = {
        "measure": prof["measure"], "first_layer": prof["layers"][0], "last_layer": prof["layers"][-1],
        "ratio_first_over_last": prof["ratio"], "layers_per_end": prof["group"],
        "per_layer": [{"layer": lay, "value": v} for lay, v in zip(prof["layers"], prof["values"])],
        "geometric_rate_per_layer": prof["rate_per_layer"], "window_steps": prof["window_steps"],
        "thresholds": dict(t),
    }  # fmt: skip
    if prof.get("blocks"):
        ev["blocks"] = prof["blocks"]
    if prof.get("left_out_near_zero_init"):
        ev["left_out_near_zero_init"] = prof["left_out_near_zero_init"]
    if prof.get("left_out_gated"):
        ev["left_out_gated"] = prof["left_out_gated"]
    if "backward_gain" in prof:
        ev["backward_gain"] = prof["backward_gain"]
    return ev
