"""``fold_bn``: fold every foldable BatchNorm exactly, refuse the rest with a reason, and
measure the result against the unfolded model in float64."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree

from normscope.errors import NormscopeError
from normscope.fold.graph import Scope, Tracing, is_bn, module_kind, one_line, propagate_shapes, trace, trace_model
from normscope.fold.match import Options, analyze
from normscope.fold.results import FP16_MAX, TINY_VAR, FoldResult, Fp16Risk, OutputError, SkippedBN
from normscope.fold.rewrite import Applied, Rewriter

MAX_PASSES = 4


def as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise NormscopeError(
        f"example_inputs must be a tensor or a non-empty tuple of positional inputs, got "
        f"{type(example_inputs).__name__}: pass e.g. (torch.randn(1, 3, 224, 224),)"
    )


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise NormscopeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _to_double(inputs: tuple) -> tuple:
    return tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)


def _run(model: nn.Module, inputs: tuple, seed: int = 0) -> list[Tensor]:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model(*inputs)
    leaves, _ = _pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())]


def compare(reference: Sequence[Tensor], candidate: Sequence[Tensor]) -> OutputError:
    """max |Δ| and max |Δ| / max |y_ref| over matching outputs, computed in float64."""
    if len(reference) != len(candidate):
        raise NormscopeError(f"the models return {len(reference)} and {len(candidate)} tensors: cannot compare")
    max_abs, max_rel = 0.0, 0.0
    for r, c in zip(reference, candidate):
        r = torch.as_tensor(r).detach().to("cpu", torch.float64)
        c = torch.as_tensor(c).detach().to("cpu", torch.float64)
        if r.shape != c.shape:
            raise NormscopeError(f"output shapes differ: {tuple(r.shape)} vs {tuple(c.shape)}")
        if r.numel() == 0:
            continue
        diff = (r - c).abs()
        d = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
        scale = float(r.abs().max())
        rel = 0.0 if d == 0 else (d / scale if scale > 0 else float("inf"))
        max_abs, max_rel = max(max_abs, d), max(max_rel, rel)
    return OutputError(max_abs, max_rel, len(reference))


def output_error(reference: nn.Module, folded: nn.Module, inputs: tuple) -> OutputError:
    """Both models deep-copied to float64 and run on the example inputs with the same seed."""
    ref = copy.deepcopy(reference).double()
    new = copy.deepcopy(folded).double()
    x = _to_double(inputs)
    try:
        expected = _run(ref, x)
    except Exception as exc:  # noqa: BLE001 - the user's model on the user's inputs
        raise NormscopeError(f"the model fails on the example inputs ({type(exc).__name__}: {one_line(exc)}): "
                             "check their shapes and dtypes") from None
    return compare(expected, _run(new, x))


def _fp16(applied: Applied, tiny_var: float) -> Fp16Risk:
    mod = applied.module
    w = mod.weight.detach().abs().max().item()
    b = 0.0 if mod.bias is None else mod.bias.detach().abs().max().item()
    shift = None if applied.shift is None else applied.shift.abs().max().item()
    tiny = torch.nonzero(applied.var < tiny_var).flatten().tolist()
    peak = max(w, b, shift or 0.0)
    return Fp16Risk(applied.pair.layer, applied.pair.bn, w, b, applied.s.abs().max().item(), tiny,
                    shift, peak > FP16_MAX)


def _fold_scope(scope: Scope, mode: str, opts: Options, inputs: tuple, root: nn.Module) -> tuple[list[Applied], list[tuple[Any, str]], Rewriter]:
    """Repeated passes of match + apply until nothing more folds; returns the folds, the
    final skips (bn_node, reason) and the rewriter (its gm is the folded scope)."""
    applied: list[Applied] = []
    rw = Rewriter(scope.gm, mode, scope.prefix, root)
    for _ in range(MAX_PASSES):
        cands, skipped = analyze(rw.gm, opts, scope.shape_error)
        done = 0
        for cand in cands:
            result, reason = rw.apply(cand)
            if result is None:
                skipped.append((cand.bn_node, reason))
            else:
                applied.append(result)
                done += 1
        rw.finish(prune=False)
        if not done or not any(n.op == "call_module" and is_bn(rw.gm.get_submodule(n.target))
                               for n in rw.gm.graph.nodes):
            break
        if mode == "modules":  # the module tree changed: trace it again
            scope.gm = trace(root)
            scope.shape_error = propagate_shapes(scope.gm, inputs)
            rw = Rewriter(scope.gm, mode, scope.prefix, root)
        else:
            rw.refresh()
    return applied, skipped, rw


def _replace_child(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def _keep_attributes(gm: nn.Module, original: nn.Module) -> None:
    """A folded child GraphModule keeps its original's plain attributes and unused children,
    so an untraced parent reading them still finds them."""
    for name, child in original.named_children():
        if not hasattr(gm, name):
            gm.add_module(name, child)
    for key, value in vars(original).items():
        if not key.startswith("_") and not hasattr(gm, key):
            setattr(gm, key, value)


def fold_bn(
    model: nn.Module,
    example_inputs: Any,
    inplace: bool = False,
    *,
    zero_padding: str = "add",
    verify: bool = True,
    tiny_var: float = TINY_VAR,
) -> FoldResult:
    """Fold every BatchNorm whose data flow provably allows it; refuse the others with a reason.

    ``zero_padding``: for BN → Conv with zero padding, "add" folds the scale and keeps the shift
    as an exact add before the conv; "refuse" skips such pairs. ``verify`` computes
    ``result.error`` (float64, on the example inputs). ``inplace=True`` edits ``model``."""
    _check_model(model)
    inputs = as_inputs(example_inputs)
    if zero_padding not in ("add", "refuse"):
        raise NormscopeError(f"zero_padding must be 'add' or 'refuse', got {zero_padding!r}")
    opts = Options(zero_padding=zero_padding)
    reference = copy.deepcopy(model) if (inplace and verify) else model
    work = model if inplace else copy.deepcopy(model)
    tracing: Tracing = trace_model(work, inputs)

    applied: list[Applied] = []
    skipped: list[SkippedBN] = []
    result_model: nn.Module = work
    for scope in tracing.scopes:
        whole = scope.prefix == ""
        mode = ("modules" if inplace else "graph") if whole else "fresh"
        done, skips, rw = _fold_scope(scope, mode, opts, scope.inputs, scope.module)
        applied += done
        for node, reason in skips:
            skipped.append(SkippedBN(scope.full(node.target), reason, scope.full(node.name)))
        if mode == "modules":
            continue
        rw.finish(prune=whole)
        if whole:
            result_model = rw.gm
        else:
            _keep_attributes(rw.gm, scope.module)
            _replace_child(work, scope.module, rw.gm)

    folded_bns = {p.pair.bn for p in applied}
    reported = {s.bn for s in skipped}
    for name, mod in model.named_modules():
        if not is_bn(mod) or name in folded_bns or name in reported:
            continue
        if module_kind(mod) != "bn":
            why = f"{type(mod).__name__} overrides BatchNorm's forward: not a stock BN, not folded"
        elif tracing.path == "torch.fx" or (tracing.called is not None and name not in tracing.called):
            why = "not called as a module in the forward (on the example inputs)"
        else:
            owner = max((p for p in tracing.untraced if name.startswith(p + ".") or p == ""), key=len, default="")
            why = (f"called from the forward of '{owner or type(model).__name__}', which does not trace "
                   f"with torch.fx ({tracing.untraced.get(owner, '?')}): its data flow cannot be proven")
        skipped.append(SkippedBN(name, why))
    error = output_error(reference, result_model, inputs) if verify else None
    risks = [_fp16(a, tiny_var) for a in applied]
    return FoldResult(result_model, [a.pair for a in applied], skipped, error, risks, tracing.path,
                      dict(tracing.untraced))


__all__ = ["fold_bn", "output_error", "compare", "as_inputs"]
