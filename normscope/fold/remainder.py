"""BN subclasses whose forward is "BatchNorm, then something elementwise" (timm's
``BatchNormAct2d``: ``F.batch_norm`` with the module's own statistics, then ``self.drop`` and
``self.act``).

The subclass's forward is traced with torch.fx on its own. It folds when, in eval mode:

- the forward takes one tensor ``x``, and ``x`` is read (beyond metadata such as ``x.ndim``) only
  by exactly one ``F.batch_norm`` call;
- that call uses the module's own ``running_mean``/``running_var``/``weight``/``bias`` (read
  nowhere else), ``training=False`` and the module's ``eps``;
- everything computed from its output is elementwise (activation/identity/dropout modules,
  elementwise functions with constant other operands).

The BN part then folds into the producer like a stock BN, and the module is replaced by the
*remainder*: the same graph with the ``batch_norm`` call removed (``nn.Identity`` when nothing
else is left). Any other overriding subclass is refused, as before.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from normscope.fold.graph import module_kind, one_line, trace

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_ELEMENTWISE_FUNCS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.softplus,
    F.hardtanh,
    F.dropout,
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    torch.mul,
    torch.add,
    torch.clamp,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "mul",
    "add",
    "sub",
    "div",
    "clamp",
    "relu_",
    "mul_",
    "add_",
    "clamp_",
    "sigmoid_",
    "tanh_",
    "contiguous",
}
_META = {"ndim", "shape", "dtype", "device", "dim", "size"}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _bn_args(node: Node) -> dict:
    bound = dict(zip(_BN_ARGS, node.args))
    bound.update(node.kwargs)
    bound.setdefault("weight", None)
    bound.setdefault("bias", None)
    bound.setdefault("training", False)
    bound.setdefault("eps", 1e-5)
    return bound


def _depends_on(node: Node, source: Node, memo: dict) -> bool:
    if node is source:
        return True
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = False
    found = any(_depends_on(a, source, memo) for a in node.all_input_nodes)
    memo[id(node)] = found
    return found


def _is_meta(node: Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _META
    return node.op == "call_method" and node.target in ("dim", "size")


def _elementwise(node: Node, gm: GraphModule) -> bool:
    others = [a for a in node.all_input_nodes]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        stock = (
            isinstance(mod, _ELEMENTWISE_MODULES)
            and type(mod).forward is next(c for c in type(mod).__mro__ if c in _ELEMENTWISE_MODULES).forward
        )
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training:
            return False
        return stock and len(others) == 1
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCS:
        return len(others) == 1 and not node.kwargs.get("training", False)
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return len(others) == 1
    return False


def _analyze(bn: nn.Module) -> tuple[Optional[nn.Module], str]:
    name = type(bn).__name__
    try:
        gm = trace(bn)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        return None, (
            f"{name} overrides BatchNorm's forward, which does not trace with torch.fx "
            f"({one_line(exc)}): not provably 'BN, then elementwise', not folded"
        )
    refuse = f"{name} overrides BatchNorm's forward and it is not 'BN, then elementwise'"
    nodes = list(gm.graph.nodes)
    places = [n for n in nodes if n.op == "placeholder"]
    bns = [n for n in nodes if n.op == "call_function" and n.target is F.batch_norm]
    if len(places) != 1 or len(bns) != 1:
        return None, f"{refuse} ({len(places)} inputs, {len(bns)} F.batch_norm calls): not folded"
    x, call = places[0], bns[0]
    a = _bn_args(call)
    own = {"running_mean": "running_mean", "running_var": "running_var"}
    if bn.affine:
        own.update(weight="weight", bias="bias")
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = a.get(key)
        if key in own:
            if not (isinstance(v, Node) and v.op == "get_attr" and v.target == own[key] and len(v.users) == 1):
                return None, f"{refuse} (F.batch_norm's {key} is not the module's own, read once): not folded"
        elif v is not None:
            return None, f"{refuse} (F.batch_norm's {key} is not the module's own): not folded"
    if a["input"] is not x or a["training"] is not False or float(a["eps"]) != float(bn.eps):
        return None, f"{refuse} (F.batch_norm is not eval-mode BN of the input with the module's eps): not folded"
    memo: dict = {}
    for n in nodes:
        if n in (x, call) or n.op == "output":
            continue
        if n.op == "get_attr":
            if n in call.all_input_nodes:
                continue
            return None, f"{refuse} (it reads '{n.target}'): not folded"
        if x in n.all_input_nodes and not _is_meta(n):
            return None, f"{refuse} (its input is also read by {n.target}): not folded"
        if _depends_on(n, call, memo):
            if not _elementwise(n, gm):
                return None, f"{refuse} ({getattr(n.target, '__name__', n.target)} after the BN): not folded"
        elif not (
            _is_meta(n)
            or n.target is torch._assert
            or n.op == "call_function"
            and n.target in (operator.eq, operator.ne, operator.ge, operator.le, operator.gt, operator.lt)
        ):
            return None, f"{refuse} ({getattr(n.target, '__name__', n.target)} besides the BN): not folded"
    call.replace_all_uses_with(x)
    gm.graph.erase_node(call)
    gm.graph.eliminate_dead_code()
    for n in list(gm.graph.nodes):
        if n.target is torch._assert:  # shape assertions on the input; the producer's output has that shape
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if all(n.op == "call_module" and module_kind(gm.get_submodule(n.target)) == "identity" for n in calls):
        return nn.Identity(), ""
    gm.training = False
    return gm, ""


def bn_remainder(bn: nn.Module) -> tuple[Optional[nn.Module], str]:
    """(what is left of ``bn``'s forward once its BN part is folded, "") or (None, reason).
    Stock BNs give ``nn.Identity``."""
    if module_kind(bn) == "bn":
        return nn.Identity(), ""
    if bn.training:
        return None, "BN is in training mode (it uses batch statistics): call model.eval() before folding"
    return _analyze(bn)


__all__ = ["bn_remainder"]
