"""Applying matched folds: weights via the pure functions in ``math``, then the graph or the
module tree.

Three modes:

- ``graph``: rewrite the GraphModule of a private copy; a module called at several sites (or
  read with get_attr, or sharing parameters) is folded into a fresh copy used only at this site.
- ``modules``: inplace=True on a fully traced model: edit the user's modules and swap the BN
  for ``nn.Identity`` (or a ``ChannelAdd``, the rest of a BN subclass, a ``ZeroBranch``) in the
  module tree; shared modules are refused.
- ``eager``: the same edits on a model whose graph was recorded from one forward
  (:mod:`normscope.fold.dataflow`): its own forward still runs, so nothing can be rewired and a
  module called at several sites, read directly or sharing weights is refused.

Before a module's weights change, parametrisations, pruning and weight norm are materialised and
other hooks refused (:mod:`normscope.fold.prepare`).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from normscope.fold import formulas as fm
from normscope.fold.match import Candidate
from normscope.fold.prepare import hook_refusal, materialize
from normscope.fold.results import FoldedPair


class ZeroBranch(nn.Module):
    """What is left of a BN-only branch re-parameterised into a conv: zeros of the input's shape
    (``a + zeros`` is exactly ``a``); in a traced graph the add is removed instead."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class ChannelAdd(nn.Module):
    """x + shift on channel axis 1: the exact remainder of a BN whose scale was folded into a
    following zero-padded Conv or ConvTranspose (s·(x + t/s) = s·x + t)."""

    def __init__(self, shift: Tensor, spatial: int):
        super().__init__()
        self.register_buffer("shift", shift.detach().reshape(-1, *([1] * spatial)).clone())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift

    def extra_repr(self) -> str:
        return f"channels={self.shift.shape[0]}"


@dataclass
class Applied:
    pair: FoldedPair
    module: nn.Module
    s: Tensor
    var: Tensor
    shift: Optional[Tensor] = None


def _finite_in(x: Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.isfinite(x).all()) and bool(torch.isfinite(x.to(dtype)).all())


def _channels(mask: Tensor, limit: int = 8) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return ", ".join(map(str, idx[:limit])) + more


class Rewriter:
    def __init__(self, gm: GraphModule, mode: str, prefix: str = "", root: Optional[nn.Module] = None):
        self.gm, self.mode, self.prefix = gm, mode, prefix
        self.root = root if root is not None else gm  # where module-tree swaps happen
        self.fresh: set[int] = set()
        self._counter = 0
        self.refresh()

    def full(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local

    def refresh(self) -> None:
        """Who is used how: call sites per module, get_attr reads, shared parameters."""
        gm = self.gm
        self.calls = Counter(id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module")
        self.read: set[int] = set()
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                parts = n.target.split(".")
                for i in range(len(parts) + 1):
                    try:
                        self.read.add(id(gm.get_submodule(".".join(parts[:i]))))
                    except AttributeError:
                        break
        owners = Counter(id(p) for m in gm.modules() for p in m.parameters(recurse=False))
        self.shares = {id(m) for m in gm.modules() if any(owners[id(p)] > 1 for p in m.parameters(recurse=False))}

    def exclusive(self, mod: nn.Module) -> bool:
        key = id(mod)
        if key in self.fresh:
            return True
        if self.mode == "fresh":
            return False
        return self.calls[key] == 1 and key not in self.read and key not in self.shares

    def _unique(self, base: str) -> str:
        while True:
            self._counter += 1
            name = f"{base.replace('.', '_')}_bnfold{self._counter}"
            if not hasattr(self.gm, name):
                return name

    def _refuse_shared(self, cand: Candidate, mod: nn.Module, bn: nn.Module) -> Optional[str]:
        if self.mode not in ("modules", "eager"):
            return None
        fix = (
            "use inplace=False"
            if self.mode == "modules"
            else "the forward was recorded, not traced, so this site cannot get its own copy"
        )
        if not self.exclusive(mod):
            return (
                f"'{self.full(cand.node.target)}' is called at {self.calls[id(mod)]} sites, is read directly or "
                f"shares its weights; folding it in place would change the others: {fix}"
            )
        if self.calls[id(bn)] != 1:
            return (
                f"the BN module is called at {self.calls[id(bn)]} sites; "
                f"swapping it out in place would change the others: {fix}"
            )
        if id(bn) in self.read:
            return (
                f"the BN's parameters or buffers are read directly outside its call; swapping it out "
                f"would break those reads: {fix}"
            )
        return None

    def apply(self, cand: Candidate) -> tuple[Optional[Applied], str]:
        gm = self.gm
        bn = gm.get_submodule(cand.bn_target)
        mod = gm.get_submodule(cand.node.target)
        for m, name in ((mod, cand.node.target), (bn, cand.bn_target)):
            why = hook_refusal(m, self.full(name))
            if why:
                return None, why
        s, t = fm.bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        bad = ~(torch.isfinite(s) & torch.isfinite(t))
        if bad.any():
            return None, f"BN statistics give a non-finite scale on channel(s) {_channels(bad)} (σ²+ε ≤ 0?)"
        why = self._refuse_shared(cand, mod, bn)
        if why:
            return None, why
        if cand.pre_add and (s == 0).any():
            return None, (
                f"γ = 0 on channel(s) {_channels(s == 0)}: the BN shift cannot move in front "
                "of the scale for a zero-padded conv"
            )
        dropped = materialize(mod)  # exact: the value the forward uses now
        shift = None
        if cand.role == "producer":
            w, b = fm.fold_into_producer(mod.weight, mod.bias, s, t, cand.kind, cand.groups)
        elif cand.role == "reparam":
            w, b = fm.add_identity_kernel(mod.weight, mod.bias, s, t, cand.groups)
        elif cand.pre_add:
            w, b = fm.scale_consumer_input(mod.weight, s, cand.kind, cand.groups), None
            shift = fm.pre_add_shift(s, t)
        else:
            w, b = fm.fold_into_consumer(mod.weight, mod.bias, s, t, cand.kind, cand.groups, cand.repeat)
        dtype = mod.weight.dtype
        for name, value in (("weights", w), ("bias", b), ("shift", shift)):
            if value is not None and not _finite_in(value, dtype):
                peak = value[torch.isfinite(value)].abs().max().item() if torch.isfinite(value).any() else float("nan")
                return None, (
                    f"folded {name} are not finite in {str(dtype).replace('torch.', '')} "
                    f"(largest finite |value| {peak:.3g}): refused"
                )
        layer_name, copy_of = cand.node.target, None
        if not self.exclusive(mod):  # graph mode only: fold into a fresh copy for this site
            copy_of = self.full(cand.node.target)
            mod = copy.deepcopy(mod)
            layer_name = self._unique(cand.node.target)
            gm.add_submodule(layer_name, mod)
            cand.node.target = layer_name
            self.fresh.add(id(mod))
        with torch.no_grad():
            mod.weight.copy_(w.to(dtype))
            if b is not None:
                if mod.bias is None:
                    mod.bias = nn.Parameter(
                        b.to(device=mod.weight.device, dtype=dtype), requires_grad=mod.weight.requires_grad
                    )
                else:
                    mod.bias.copy_(b.to(mod.bias.dtype))
        replacement: nn.Module = cand.remainder if cand.remainder is not None else nn.Identity()
        if shift is not None:
            replacement = ChannelAdd(shift.to(device=mod.weight.device, dtype=dtype), mod.weight.dim() - 2)
        if cand.role == "reparam":
            replacement = ZeroBranch()
        site = "" if self.mode == "eager" else cand.bn_node.name  # recorded node names are not stable
        if self.mode in ("modules", "eager"):
            _swap(self.root, bn, replacement)
        elif cand.role == "reparam":
            add = cand.add_node
            other = add.args[1] if add.args[0] is cand.bn_node else add.args[0]
            add.replace_all_uses_with(other)
            gm.graph.erase_node(add)
            gm.graph.erase_node(cand.bn_node)
        elif shift is None and cand.remainder is None:
            cand.bn_node.replace_all_uses_with(cand.bn_node.args[0])
            gm.graph.erase_node(cand.bn_node)
        else:
            name = self._unique(cand.bn_target + ("_shift" if shift is not None else "_rest"))
            gm.add_submodule(name, replacement)
            cand.bn_node.target = name
        pair = FoldedPair(
            layer=self.full(layer_name),
            bn=self.full(cand.bn_target),
            pattern=cand.pattern,
            role=cand.role,
            site=self.full(site) if self.prefix else site,
            copy_of=copy_of,
            pre_add=shift is not None,
            materialized=dropped,
        )
        return Applied(pair, mod, s, bn.running_var.detach().to(torch.float64), shift), ""

    def finish(self, prune: bool) -> None:
        if self.mode == "modules":
            return
        self.gm.graph.lint()
        self.gm.recompile()
        if prune:
            self.gm.delete_all_unused_submodules()


def _swap(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every registration of ``old`` in ``root``'s module tree by ``new``."""
    for parent in root.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new
