"""Matching: decide, from the traced data flow, which BN call sites fold and where.

The graph is a torch.fx graph: symbolically traced, or recorded from one real forward
(:mod:`normscope.fold.dataflow`). A BN call site folds into its producer when the producer (a
stock Conv, ConvTranspose or Linear module) feeds it through nothing but identity/permute/
transpose ops and reshapes that provably keep the feature axis (same size, same product of the
axes before it), every value on the way has exactly one user, and the producer's feature axis
lands on BN's channel axis 1. Otherwise it may fold into its single consumer (Conv,
ConvTranspose, Linear, possibly through a flatten). A BN-only branch ``BN(x)`` summed with a
branch ``Conv(x)`` that reads the same ``x`` (stride 1, "same" padding, C_in = C_out) folds into
that conv as an identity kernel (RepVGG's structural re-parameterisation). BN subclasses fold
only as "BN, then elementwise" (:mod:`normscope.fold.remainder`), into their producer. Each
refusal comes with a one-line reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

from normscope.fold.graph import is_bn, module_kind, shape_of
from normscope.fold.prepare import hook_refusal
from normscope.fold.remainder import bn_remainder

_PERMUTES = {"permute", "transpose", "contiguous"}
_FLATTENS = {"flatten", "view", "reshape"}


@dataclass
class Candidate:
    bn_node: Node
    bn_target: str
    role: str  # "producer" | "consumer"
    node: Node  # the producer's or consumer's call_module node
    kind: str  # conv | convT | linear
    pattern: str
    pre_add: bool = False
    repeat: int = 1  # flatten: positions per BN channel in the Linear input
    groups: int = 1
    remainder: Optional[nn.Module] = None  # what replaces the BN module (None: nn.Identity)
    add_node: Optional[Node] = None  # reparam: the add that sums BN(x) with the conv branch


@dataclass
class Options:
    zero_padding: str = "add"  # "add" | "refuse"


def describe(node: Node, gm: GraphModule) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name} ({node.op})"


def label(node: Node, gm: GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


_META_METHODS = {"size", "dim", "numel", "ndimension"}
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}


def _metadata_only(user: Node) -> bool:
    """A use that reads only shape/dtype metadata, which folding never changes."""
    if user.op == "call_method" and user.target in _META_METHODS:
        return True
    return (
        user.op == "call_function" and user.target is getattr and len(user.args) == 2 and user.args[1] in _META_ATTRS
    ) or (user.op == "call_function" and user.target is len)


_AS_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}


def _shape_template_only(user: Node, node: Node) -> bool:
    """``y.reshape_as(node)`` and friends read only ``node``'s shape (or dtype)."""
    return (
        user.op == "call_method"
        and user.target in _AS_METHODS
        and len(user.args) == 2
        and user.args[0] is not node
        and user.args[1] is node
        and not user.kwargs
    )


def data_users(node: Node) -> list[Node]:
    return [u for u in node.users if not _metadata_only(u) and not _shape_template_only(u, node)]


def reshape_axis(src: tuple, dst: tuple, axis: int) -> Optional[int]:
    """Where axis ``axis`` of ``src`` lands after a row-major reshape to ``dst``, when every
    element keeps its index along it: same size and same product of the axes before it."""
    if math.prod(src) != math.prod(dst):
        return None
    before = math.prod(src[:axis])
    for b in range(len(dst)):
        if math.prod(dst[:b]) == before and dst[b] == src[axis]:
            return b
    return None


def _norm(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _perm_of(node: Node, gm: GraphModule) -> Optional[list[int]]:
    """Axis permutation (output axis a <- input axis perm[a]) of a pure layout op, or None."""
    if node.op == "call_module":
        kind = module_kind(gm.get_submodule(node.target))
        nd = shape_of(node)
        if kind == "identity" and nd is not None and len(node.args) == 1 and not node.kwargs:
            return list(range(len(nd)))
        return None
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.permute, torch.transpose):
        name = node.target.__name__
    else:
        return None
    if name not in _PERMUTES:
        return None
    out = shape_of(node)
    if out is None or node.kwargs:
        return None
    nd = len(out)
    dims = list(node.args[1:])
    if name == "contiguous":
        return list(range(nd)) if not dims else None
    if not all(isinstance(d, int) for d in dims):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)) and all(isinstance(d, int) for d in dims[0]):
            dims = list(dims[0])
        else:
            return None
    if name == "permute":
        return [_norm(d, nd) for d in dims] if len(dims) == nd else None
    if len(dims) != 2:
        return None
    perm = list(range(nd))
    a, b = _norm(dims[0], nd), _norm(dims[1], nd)
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _is_flatten(node: Node, gm: GraphModule) -> bool:
    if node.op == "call_module":
        return module_kind(gm.get_submodule(node.target)) == "flatten"
    if node.op == "call_method":
        return node.target in _FLATTENS
    return node.op == "call_function" and node.target in (torch.flatten, torch.reshape)


def _feature_axis(kind: str, ndim: int) -> int:
    return 1 if kind in ("conv", "convT") else ndim - 1


def _spatial(mod: nn.Module) -> int:
    return len(mod.kernel_size)


def find_producer(bn_node: Node, gm: GraphModule) -> tuple[Optional[Candidate], str]:
    bn = gm.get_submodule(bn_node.target)
    x, axis, via = bn_node.args[0], 1, []
    while True:
        if not isinstance(x, Node):
            return None, "input is not a traced tensor"
        users = len(data_users(x))
        if users != 1:
            return None, (
                f"input {describe(x, gm)} has {users} consumers; folding into its producer would change the others"
            )
        perm = _perm_of(x, gm)
        if perm is not None:
            axis = perm[axis]
        elif (
            _is_flatten(x, gm)
            and x.args
            and isinstance(x.args[0], Node)
            and all(isinstance(a, (int, tuple, list)) for a in x.args[1:])
        ):
            src, dst = shape_of(x.args[0]), shape_of(x)
            back = None
            if src is not None and dst is not None:
                for a in range(len(src)):  # the input axis that lands on ``axis``
                    if reshape_axis(src, dst, a) == axis:
                        back = a
                        break
            if back is None:
                return None, (
                    f"input comes through {describe(x, gm)}, which does not provably keep "
                    f"BN's channel axis {axis} of {dst} as one axis of {src}"
                )
            axis = back
        else:
            break
        via.append(label(x, gm))
        x = x.args[0]
    kind = module_kind(gm.get_submodule(x.target)) if x.op == "call_module" else None
    if kind not in ("conv", "convT", "linear"):
        return None, f"input comes from {describe(x, gm)}, not a Conv/ConvTranspose/Linear module"
    mod = gm.get_submodule(x.target)
    out = shape_of(x)
    if out is None:
        return None, f"no shape known for the output of {describe(x, gm)}"
    if kind != "linear" and len(out) != _spatial(mod) + 2:
        return None, f"{describe(x, gm)} runs on an unbatched input; its channel axis is not BN's axis 1"
    feat = _feature_axis(kind, len(out))
    bn_name = type(bn).__name__
    if axis != feat:
        return None, (
            f"{bn_name} normalises axis {axis} of the {describe(x, gm)} output "
            f"{tuple(out)}, but that module writes its features on axis {feat}"
        )
    n_out = mod.out_features if kind == "linear" else mod.out_channels
    if n_out != bn.num_features:
        return None, f"{describe(x, gm)} has {n_out} outputs, BN has {bn.num_features} channels"
    chain = " → ".join([type(mod).__name__, *reversed(via), bn_name])
    groups = getattr(mod, "groups", 1)
    return Candidate(bn_node, bn_node.target, "producer", x, kind, chain, groups=groups), ""


def _zero_padded(conv: nn.Module) -> bool:
    """True when some output position of this (non-transposed) conv reads padding zeros."""
    return conv.padding_mode == "zeros" and any(p != 0 for p in conv._reversed_padding_repeated_twice)


def find_consumer(bn_node: Node, gm: GraphModule, opts: Options) -> tuple[Optional[Candidate], str]:
    bn = gm.get_submodule(bn_node.target)
    y, axis, repeat, via = bn_node, 1, 1, []
    while True:
        users = data_users(y)
        if len(users) != 1:
            return None, f"output has {len(users)} consumers"
        u = users[0]
        if not u.args or u.args[0] is not y:
            return None, f"output feeds {describe(u, gm)} as a non-data argument"
        perm = _perm_of(u, gm)
        if perm is not None:
            axis = perm.index(axis)
        elif _is_flatten(u, gm) and repeat == 1:
            src, dst = shape_of(y), shape_of(u)
            if (
                src is None
                or dst is None
                or axis != 1
                or len(src) < 2
                or len(dst) != 2
                or dst[0] != src[0]
                or dst[1] != math.prod(src[1:])
            ):
                return None, (
                    f"output goes through {describe(u, gm)} that does not provably flatten (N, C, …) into (N, C·…)"
                )
            repeat = math.prod(src[2:])
        else:
            break
        via.append(label(u, gm))
        y = u
    kind = module_kind(gm.get_submodule(u.target)) if u.op == "call_module" else None
    if kind not in ("conv", "convT", "linear"):
        return None, f"output goes to {describe(u, gm)}, not a Conv/ConvTranspose/Linear module"
    if len(u.args) != 1 or u.kwargs:
        return None, f"{describe(u, gm)} is called with extra arguments"
    mod = gm.get_submodule(u.target)
    src = shape_of(y)
    if src is None:
        return None, "no shape known for the BN output"
    bn_name, name = type(bn).__name__, type(mod).__name__
    chain = " → ".join([bn_name, *via, name])
    if kind == "linear":
        if axis != len(src) - 1:
            return None, (
                f"{name} {describe(u, gm)} reads the last axis of {tuple(src)}, but {bn_name} normalises axis {axis}"
            )
        if mod.in_features != bn.num_features * repeat:
            return None, f"{describe(u, gm)} has {mod.in_features} inputs, not {bn.num_features}×{repeat}"
        return Candidate(bn_node, bn_node.target, "consumer", u, kind, chain, repeat=repeat), ""
    if repeat != 1 or axis != 1 or len(src) != _spatial(mod) + 2:
        return None, f"{describe(u, gm)} does not read BN's channel axis as its input channels"
    if mod.in_channels != bn.num_features:
        return None, f"{describe(u, gm)} has {mod.in_channels} input channels, BN has {bn.num_features}"
    pre_add = kind == "convT" or _zero_padded(mod)  # ConvTranspose: border outputs get fewer taps
    if pre_add and opts.zero_padding != "add":
        why = "ConvTranspose" if kind == "convT" else "zero padding"
        return None, (
            f"{describe(u, gm)} uses {why}: the BN shift is not exact at the borders "
            "(pass zero_padding='add' to keep it as an add before the conv)"
        )
    if pre_add:
        chain += " (scale folded, shift kept as an add)"
    return Candidate(bn_node, bn_node.target, "consumer", u, kind, chain, pre_add=pre_add, groups=mod.groups), ""


def bn_precheck(bn: nn.Module) -> Optional[str]:
    if bn.training:
        return "BN is in training mode (it uses batch statistics): call model.eval() before folding"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: BN uses batch statistics at inference, nothing constant to fold"
    return None


def find_candidates(
    gm: GraphModule, opts: Options, shape_error: Optional[str]
) -> tuple[list[Candidate], list[tuple[Node, str]]]:
    """Candidates (one per foldable BN call site) and (bn_node, reason) for the others."""
    cands: list[Candidate] = []
    skipped: list[tuple[Node, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_bn(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        reason = bn_precheck(bn) or hook_refusal(bn, node.target)
        remainder = None
        if reason is None and module_kind(bn) != "bn":
            remainder, reason = bn_remainder(bn)
            reason = reason or None
        if reason is None and (len(node.args) != 1 or node.kwargs):
            reason = "BN is called with extra arguments"
        if reason is None and shape_error is not None:
            reason = f"shape propagation on the example inputs failed ({shape_error}): nothing is provable"
        if reason is not None:
            skipped.append((node, reason))
            continue
        cand, why_in = find_producer(node, gm)
        if cand is not None and remainder is not None:
            cand.remainder = remainder
            cand.pattern = cand.pattern + " (BN part; the rest kept)"
        elif cand is None and remainder is not None:
            skipped.append((node, f"input: {why_in}; a BN subclass folds only into its producer"))
            continue
        if cand is None:
            cand, why_out = find_consumer(node, gm, opts)
            if cand is None:
                cand, why_rep = find_reparam(node, gm)
                if cand is None:
                    skipped.append(
                        (node, f"input: {why_in}; output: {why_out}" + (f"; branch: {why_rep}" if why_rep else ""))
                    )
                    continue
        cands.append(cand)
    return cands, skipped


_ADDS = {"add", "add_", "__add__", "__radd__", "__iadd__"}


def _is_add(node: Node) -> bool:
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
        return False
    if node.op == "call_function":
        return node.target in (operator.add, torch.add, operator.iadd)
    return node.op == "call_method" and node.target in _ADDS


def _through_identity(node: Node, gm: GraphModule) -> Node:
    """Back from ``node`` through single-use identity modules (folded BNs leave them)."""
    while (
        node.op == "call_module"
        and module_kind(gm.get_submodule(node.target)) == "identity"
        and len(node.args) == 1
        and isinstance(node.args[0], Node)
        and len(data_users(node.args[0])) == 1
    ):
        node = node.args[0]
    return node


def _summands(node: Node, gm: GraphModule, out: list[Node]) -> None:
    for a in node.args:
        src = _through_identity(a, gm)
        if _is_add(src) and len(data_users(src)) == 1:
            _summands(src, gm, out)
        else:
            out.append(a)


def find_reparam(bn_node: Node, gm: GraphModule) -> tuple[Optional[Candidate], str]:
    """BN(x) + … + Conv(x) → Conv′(x): BN's scale as an identity kernel, its shift as bias."""
    bn = gm.get_submodule(bn_node.target)
    if module_kind(bn) != "bn":
        return None, ""
    users = data_users(bn_node)
    if len(users) != 1 or not _is_add(users[0]):
        return None, ""
    x = bn_node.args[0]
    top = users[0]  # the largest tree of single-use adds containing BN(x)
    while len(data_users(top)) == 1 and _is_add(data_users(top)[0]):
        top = data_users(top)[0]
    terms: list[Node] = []
    _summands(top, gm, terms)
    if bn_node not in terms:
        return None, ""
    why = "summed with no Conv branch that reads the same input with stride 1, 'same' padding and C_in = C_out"
    for term in terms:
        conv_node = _through_identity(term, gm)
        if conv_node.op != "call_module" or module_kind(gm.get_submodule(conv_node.target)) != "conv":
            continue
        conv = gm.get_submodule(conv_node.target)
        if conv_node.args != (x,) or conv_node.kwargs or len(data_users(conv_node)) != 1:
            continue
        k, d, p = conv.kernel_size, conv.dilation, conv.padding
        if (
            isinstance(p, str)
            or any(s != 1 for s in conv.stride)
            or any(kk % 2 == 0 for kk in k)
            or any(pp != (kk - 1) // 2 * dd for pp, kk, dd in zip(p, k, d))
        ):
            continue
        if not (conv.in_channels == conv.out_channels == bn.num_features):
            continue
        if shape_of(conv_node) is None or shape_of(conv_node) != shape_of(x):
            continue
        pattern = f"BN identity branch + {type(conv).__name__} branch → {type(conv).__name__} (identity kernel)"
        return Candidate(
            bn_node, bn_node.target, "reparam", conv_node, "conv", pattern, groups=conv.groups, add_node=users[0]
        ), ""
    return None, why


__all__ = [
    "Candidate",
    "Options",
    "find_candidates",
    "find_producer",
    "find_consumer",
    "find_reparam",
    "bn_precheck",
    "reshape_axis",
]
