"""Extra passes the probe runs after (or before) training; none changes the model.

- BN passes: per BN input, population mean/var (PreciseBN: equal weight per element,
  E[x²] − E[x]²) on the probe data, in eval mode with dropout off (``<data>/eval``) and with
  dropout on (``<data>/drop``), next to the running statistics;
- the train-mode vs eval-mode output gap (BN with batch vs running statistics, same dropout mask);
- per-feature statistics of the model inputs (the first layer's input);
- signal propagation at residual-block outputs (Brock, De & Smith 2021).

Module modes and BN buffers are restored after every pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from normscope.analyze.graph import Graph
from normscope.roles import DROPOUT


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(x: Any, dev: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, dev) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, dev) for k, v in x.items()}
    return x


def split_batch(batch: Any) -> tuple[Any, Any]:
    from normscope.errors import NormscopeError

    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise NormscopeError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ": wrap your data so it yields (x, y)."
    )


def forward(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def batch_size(x: Any) -> int:
    t = first_tensor(x)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1


def take_samples(batches: Iterable, max_samples: int, max_batches: int = 64) -> list:
    """Input parts of the first batches, up to ``max_samples`` samples."""
    out, n = [], 0
    for i, b in enumerate(batches):
        x, _ = split_batch(b)
        out.append(x)
        n += batch_size(x)
        if n >= max_samples or i + 1 >= max_batches:
            break
    return out


def concat_inputs(xs: list, limit: int) -> Any:
    """One big batch from several input batches (tensors, tuples or dicts of tensors)."""
    first = xs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(xs)[:limit]
    if isinstance(first, (tuple, list)):
        return type(first)(concat_inputs([x[i] for x in xs], limit) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_inputs([x[k] for x in xs], limit) for k in first}
    return first


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Restore every module's train/eval flag and every buffer (BN running statistics) on exit."""
    modes = {m: m.training for m in model.modules()}
    bufs = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in bufs:
                if b.shape == v.shape:
                    b.copy_(v)
        for m, t in modes.items():
            m.train(t)


def fork_rng(seed: int | None):
    devices = [] if not torch.cuda.is_available() else None
    ctx = torch.random.fork_rng(devices=devices) if devices is not None else torch.random.fork_rng()
    if seed is None:
        return ctx

    @contextlib.contextmanager
    def seeded():
        with ctx:
            torch.manual_seed(seed)
            yield

    return seeded()


def has_dropout(model: nn.Module) -> bool:
    return any(type(m).__name__ in DROPOUT and getattr(m, "p", 0) > 0 for m in model.modules())


def _set_dropout(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(on)


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n or "<root>", m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_passes(model: nn.Module, data: dict[str, list], seed: int = 0) -> dict[str, dict]:
    """Per BN: running statistics and population statistics of its input for each pass."""
    bns = bn_modules(model)
    if not bns:
        return {}
    dev = device_of(model)
    acc: dict[str, dict[str, list]] = {n: {} for n, _ in bns}
    current = [""]

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
                return
            xd = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
            a = acc[name].setdefault(current[0], [0.0, 0.0, 0.0, 0])
            a[0] += xd.shape[1]
            a[1] = a[1] + xd.sum(1)
            a[2] = a[2] + (xd * xd).sum(1)
            a[3] += x.shape[0]

        return hook

    drop = has_dropout(model)
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in bns]
    try:
        with preserved(model), torch.no_grad(), fork_rng(seed):
            for dname, xs in data.items():
                for mode in ("eval", "drop") if drop else ("eval",):
                    current[0] = f"{dname}/{mode}"
                    model.eval()
                    _set_dropout(model, mode == "drop")
                    for x in xs:
                        forward(model, to_device(x, dev))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in bns:
        rm = m.running_mean.detach().double().cpu().numpy() if m.running_mean is not None else None
        rv = m.running_var.detach().double().cpu().numpy() if m.running_var is not None else None
        passes = {}
        for key, (n, s1, s2, samples) in acc[name].items():
            mean = (s1 / n).cpu().numpy()
            var = np.maximum((s2 / n).cpu().numpy() - mean * mean, 0.0)
            passes[key] = {"mean": mean.tolist(), "var": var.tolist(), "count": int(n), "samples": int(samples)}
        out[name] = {
            "type": type(m).__name__, "eps": float(m.eps), "momentum": m.momentum,
            "track_running_stats": bool(m.track_running_stats), "num_features": int(m.num_features),
            "running_mean": rm.tolist() if rm is not None else None,
            "running_var": rv.tolist() if rv is not None else None, "passes": passes,
        }  # fmt: skip
    return out


def bn_output_gap(model: nn.Module, x: Any, seed: int = 0) -> float | None:
    """‖y_trainBN − y_evalBN‖ / ‖y_evalBN‖ on one batch (dropout as in training, same mask)."""
    bns = bn_modules(model)
    if not bns:
        return None
    dev = device_of(model)
    x = to_device(x, dev)
    drop = has_dropout(model)
    with preserved(model), torch.no_grad():
        model.eval()
        _set_dropout(model, drop)
        with fork_rng(seed):
            ye = first_tensor(forward(model, x))
        for _, m in bns:
            m.train()
        with fork_rng(seed):
            yt = first_tensor(forward(model, x))
    if ye is None or yt is None or not ye.is_floating_point():
        return None
    den = float(torch.linalg.vector_norm(ye.double()))
    if not math.isfinite(den) or den == 0:
        return None
    return float(torch.linalg.vector_norm((yt - ye).double())) / den


def feature_axis(model: nn.Module, first_layer_type: str | None, x: torch.Tensor) -> int:
    """The axis of the input's features: channels for image-shaped N×C×H×W (and 5-D) inputs,
    normalised per channel as usual; the first layer's layout for 3-D; the last axis for tables."""
    if x.dim() <= 2:
        return -1
    if x.dim() >= 4:
        return 1
    t = first_layer_type or ""
    if t.startswith(("Conv", "BatchNorm2d", "BatchNorm3d", "InstanceNorm", "LazyConv", "MaxPool", "AvgPool")):
        return 1
    if t.startswith("BatchNorm1d") and x.dim() == 3:
        return 1
    return -1


DISCRETE_MAX_VALUES = 32  # an integer-valued column with at most this many values is categorical


def input_stats(xs: list, axis: int) -> dict | None:
    ts = [first_tensor(x) for x in xs]
    ts = [t for t in ts if t is not None and t.is_floating_point()]
    if not ts:
        return None
    x = torch.cat([t.detach().double().cpu() for t in ts])
    if x.dim() == 1:
        x = x[:, None]
    xm = x.movedim(axis, -1).reshape(-1, x.shape[axis])
    mean = xm.mean(0)
    std = xm.std(0, unbiased=False)
    # discrete columns (one-hot, binary flags, small integer codes): their scale is not a feature's
    # scale and standardising them is optional; the check leaves them out of the scale test
    discrete = []
    if xm.shape[1] <= 4096:
        integral = (xm == xm.round()).all(0)
        for j in torch.nonzero(integral).flatten().tolist():
            if torch.unique(xm[:, j]).numel() <= DISCRETE_MAX_VALUES:
                discrete.append(j)
    return {"axis": axis, "shape": list(ts[0].shape[1:]), "samples": int(x.shape[0]),
            "mean": mean.numpy().tolist(), "std": std.numpy().tolist(), "discrete": discrete}  # fmt: skip


def _chan_stats(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().double()
    if t.dim() >= 3:
        v = t.transpose(0, 1).reshape(t.shape[1], -1)
    elif t.dim() == 2:
        v = t.t()
    else:
        v = t.reshape(1, -1)
    m = v.mean(1)
    var = v.var(1, unbiased=False)
    return float((m * m).mean()), float(var.mean())


def _branch_module(g: Graph, block: str) -> str | None:
    """The module whose output is the residual branch added inside ``block`` (the add input with
    more modules behind it inside the block)."""

    def inside(n) -> bool:
        if n.op == "module":
            return bool(n.module) and n.module.startswith(block + ".")
        return block in n.scope

    for n in g.nodes.values():
        if (
            n.op == "function"
            and n.type in ("add", "iadd", "__add__", "__iadd__", "add_")
            and n.scope
            and n.scope[-1] == block
        ):
            best, best_k = None, -1
            for pred in g.producers(n.id):
                k = sum(1 for u in g.upstream(pred.id, stop=lambda u: not inside(u)) if u.op == "module" and inside(u))
                k += 1 if pred.op == "module" and inside(pred) else 0
                if k > best_k:
                    best, best_k = pred, k
            if best is not None and best.op == "module" and inside(best):
                return best.module
    return None


def measure_signal(model: nn.Module, x: Any, graph: Graph | None, when: str, step: int, seed: int = 0) -> list[dict]:
    """Average channel squared mean and variance at residual-block outputs (train-mode forward)."""
    if graph is None:
        return []
    blocks = [b for b in graph.residual_blocks() if b]
    if not blocks:
        return []
    mods = dict(model.named_modules())
    found: dict[str, torch.Tensor] = {}
    branch_found: dict[str, torch.Tensor] = {}
    handles = []

    def keep(store: dict, key: str):
        def hook(mod, args, out):  # returns None: never replaces the module's output
            t = first_tensor(out)
            if key not in store and t is not None:
                store[key] = t.detach().clone()

        return hook

    for b in blocks:
        if b not in mods:
            continue
        handles.append(mods[b].register_forward_hook(keep(found, b)))
        br = _branch_module(graph, b)
        if br and br in mods:
            handles.append(mods[br].register_forward_hook(keep(branch_found, b)))
    try:
        with preserved(model), torch.no_grad(), fork_rng(seed):
            model.train()
            forward(model, to_device(x, device_of(model)))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i, b in enumerate(blocks):
        t = found.get(b)
        if t is None or not t.is_floating_point():
            continue
        sq, var = _chan_stats(t)
        br = branch_found.get(b)
        rows.append({"when": when, "step": step, "order": i, "layer": b, "call": 0, "kind": "block",
                     "avg_sq_mean": sq, "avg_var": var,
                     "branch_var": _chan_stats(br)[1] if br is not None else None})  # fmt: skip
    return rows


def optimizer_groups(model: nn.Module, opt) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in opt.param_groups:
        lr = g.get("lr")
        groups.append({
            "lr": float(lr) if isinstance(lr, (int, float)) else (float(lr) if isinstance(lr, torch.Tensor) else None),
            "weight_decay": float(g.get("weight_decay", 0.0) or 0.0),
            "params": [names.get(id(p), "?") for p in g["params"]],
        })  # fmt: skip
    return {"type": type(opt).__name__, "groups": groups}


def distributed_info() -> dict:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return {"initialized": True, "world_size": int(dist.get_world_size()), "rank": int(dist.get_rank())}
    except Exception:  # pragma: no cover
        pass
    return {"initialized": False, "world_size": 1}


def params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
