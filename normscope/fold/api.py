"""``fold_bn``: fold every foldable BatchNorm exactly, refuse the rest with a reason, and
measure the result against the unfolded model in float64."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree

from normscope.errors import NormscopeError
from normscope.fold.dataflow import DataflowGraph, record
from normscope.fold.graph import ModuleScope, is_bn, one_line, propagate_shapes, script_modules, trace, trace_fx
from normscope.fold.match import Options, find_candidates
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


def clone_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also for models holding non-leaf tensors (pruning and the old weight_norm
    keep ``weight`` as a computed tensor, recomputed by their pre-hook each forward; caches such
    as LeViT's attention-bias cache keep tensors computed with grad): those are copied detached."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as exc:
        if "deepcopy" not in str(exc):
            raise
    memo: dict = {}

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, Tensor):
            if not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif depth < 4 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)

    for m in model.modules():
        for v in vars(m).values():
            visit(v)
    return copy.deepcopy(model, memo)


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
    return compare(reference_outputs(reference, inputs), _run(clone_model(folded).double(), _to_double(inputs)))


def _fp16(applied: Applied, tiny_var: float) -> Fp16Risk:
    mod = applied.module
    w = mod.weight.detach().abs().max().item()
    b = 0.0 if mod.bias is None else mod.bias.detach().abs().max().item()
    shift = None if applied.shift is None else applied.shift.abs().max().item()
    tiny = torch.nonzero(applied.var < tiny_var).flatten().tolist()
    peak = max(w, b, shift or 0.0)
    return Fp16Risk(
        applied.pair.layer, applied.pair.bn, w, b, applied.s.abs().max().item(), tiny, shift, peak > FP16_MAX
    )


_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
Key = tuple  # (bn path, site): one BN call site
Gate = Callable[[Key], Optional[str]]


def default_tolerance(model: nn.Module) -> float:
    """The verification tolerance for the model's parameter dtypes (the loosest one wins)."""
    dtypes = {p.dtype for p in [*model.parameters(), *model.buffers()] if p.is_floating_point()}
    return max((_TOLERANCE.get(d, 1e-4) for d in dtypes), default=1e-4)


@dataclass
class _Attempt:
    model: nn.Module
    applied: list[Applied]
    skipped: list[SkippedBN]
    path: str
    untraced: dict[str, str]


def _fold_fx(
    scope: ModuleScope, mode: str, opts: Options, root: nn.Module, gate: Gate
) -> tuple[list[Applied], list[tuple[Any, str]], Rewriter]:
    """Repeated passes of match + apply until nothing more folds; returns the folds, the
    final skips (bn_node, reason) and the rewriter (its gm is the folded scope)."""
    applied: list[Applied] = []
    rw = Rewriter(scope.gm, mode, scope.prefix, root)
    for _ in range(MAX_PASSES):
        cands, skipped = find_candidates(rw.gm, opts, scope.shape_error)
        done = 0
        for cand in cands:
            reason = gate((scope.full(cand.bn_target), scope.full(cand.bn_node.name)))
            if reason is None:
                result, reason = _safe_apply(rw, cand)
            if reason:
                skipped.append((cand.bn_node, reason))
                continue
            applied.append(result)
            done += 1
        rw.finish(prune=False)
        if not done or not any(
            n.op == "call_module" and is_bn(rw.gm.get_submodule(n.target)) for n in rw.gm.graph.nodes
        ):
            break
        if mode == "modules":  # the module tree changed: trace it again
            scope.gm = trace(root)
            scope.shape_error = propagate_shapes(scope.gm, scope.inputs)
            rw = Rewriter(scope.gm, mode, scope.prefix, root)
        else:
            rw.refresh()
    return applied, skipped, rw


def _safe_apply(rw: Rewriter, cand: Any) -> tuple[Optional[Applied], str]:
    try:
        return rw.apply(cand)
    except Exception as exc:  # noqa: BLE001 - never a raw exception: this pair is refused instead
        return None, f"folding raised {type(exc).__name__} ({one_line(exc)}): refused"


def _fold_eager(
    work: nn.Module, inputs: tuple, opts: Options, gate: Gate, first: Optional[DataflowGraph] = None
) -> tuple[list[Applied], list[tuple[Any, str]], set[str]]:
    """The data-flow path: record one forward, match, edit the module tree; again while
    something folded (chains such as BN → BN → Conv, RepVGG branches after their BNs).
    ``first``: the graph already recorded on an identical copy (the float64 reference run)."""
    applied: list[Applied] = []
    skipped: list[tuple[Any, str]] = []
    called: set[str] = set()
    for n_pass in range(MAX_PASSES):
        try:
            if n_pass == 0 and first is not None:
                dg = dataclasses.replace(first, model=work)  # same module names, same shapes
            else:
                with torch.random.fork_rng(devices=[]):
                    dg = record(work, inputs)
        except Exception as exc:  # noqa: BLE001 - the user's model on the user's inputs
            if n_pass:  # a fold of the previous pass broke the forward: the float64 gate undoes it
                break
            raise NormscopeError(
                f"the model fails on the example inputs ({type(exc).__name__}: {one_line(exc)}): "
                "check their shapes and dtypes"
            ) from None
        called |= dg.called
        cands, skipped = find_candidates(dg, opts, None)
        rw = Rewriter(dg, "eager", "", work)
        done = 0
        for cand in cands:
            reason = dg.blocked(cand.bn_target, cand.node.target) or gate((cand.bn_target, ""))
            if reason is None:
                result, reason = _safe_apply(rw, cand)
            if reason:
                skipped.append((cand.bn_node, reason))
                continue
            applied.append(result)
            done += 1
        if not done or not any(n.op == "call_module" and is_bn(work.get_submodule(n.target)) for n in dg.graph.nodes):
            break
    return applied, skipped, called


def _fold_once(
    work: nn.Module,
    inputs: tuple,
    opts: Options,
    inplace: bool,
    gate: Gate,
    pre: Optional[tuple[str, DataflowGraph]] = None,
) -> _Attempt:
    """One fold of ``work``. ``pre``: (why fx does not trace, the recorded graph) from the
    reference run on an identical copy, to skip both."""
    scope, why = (None, pre[0]) if pre is not None else trace_fx(work, inputs)
    skipped: list[SkippedBN] = []
    if scope is not None:
        mode = "modules" if inplace else "graph"
        applied, skips, rw = _fold_fx(scope, mode, opts, work, gate)
        for node, reason in skips:
            skipped.append(SkippedBN(scope.full(node.target), reason, scope.full(node.name)))
        result_model = work
        if mode == "graph":
            rw.finish(prune=True)
            result_model = rw.gm
            _keep_attributes(result_model, work)
        path, untraced, called = "torch.fx", {}, None
    else:
        applied, skips, called = _fold_eager(work, inputs, opts, gate, None if pre is None else pre[1])
        for node, reason in skips:
            skipped.append(SkippedBN(node.target, reason))
        result_model, path, untraced = work, "dataflow", {"": why}
    folded = {a.pair.bn for a in applied}
    reported = {s.bn for s in skipped}
    for name, mod in work.named_modules() if scope is None or mode == "modules" else scope.module.named_modules():
        if not is_bn(mod) or name in folded or name in reported:
            continue
        skipped.append(SkippedBN(name, "not called as a module in the forward (on the example inputs)"))
    return _Attempt(result_model, applied, skipped, path, untraced)


def _keep_attributes(gm: nn.Module, original: nn.Module) -> None:
    """A GraphModule made from ``original`` keeps its plain attributes (``config``, …) and
    unused children, so code reading them still finds them, also after copy.deepcopy."""
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

    kept = {}
    for key, value in vars(original).items():
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
            kept[key] = value
    if kept and hasattr(gm, "meta"):
        gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(kept)


def _script_refusal(model: nn.Module) -> Optional[FoldResult]:
    scripted = script_modules(model)
    if not scripted:
        return None
    where = f"'{scripted[0]}' is" if scripted[0] else "the model is"
    why = (
        f"{where} a torch.jit scripted/traced module: its code is TorchScript, not Python, so its data "
        "flow cannot be traced or edited; fold the original nn.Module before scripting"
    )
    bns = []
    try:
        for name, m in model.named_modules():
            if "BatchNorm" in (getattr(m, "original_name", "") or type(m).__name__):
                bns.append(name)
    except Exception:  # noqa: BLE001
        pass
    skipped = [SkippedBN(b or type(model).__name__, why) for b in bns] or [SkippedBN(type(model).__name__, why)]
    return FoldResult(model, [], skipped, None, [], "none", {"": why})


def fold_bn(
    model: nn.Module,
    example_inputs: Any,
    inplace: bool = False,
    *,
    zero_padding: str = "add",
    verify: bool = True,
    tiny_var: float = TINY_VAR,
    tolerance: Optional[float] = None,
) -> FoldResult:
    """Fold every BatchNorm whose data flow provably allows it; refuse the others with a reason.

    ``zero_padding``: for BN → Conv with zero padding, "add" folds the scale and keeps the shift
    as an exact add before the conv; "refuse" skips such pairs. ``verify`` runs the folded and
    the unfolded model in float64 on the example inputs (``result.error``) and *gates*: folds
    whose check exceeds ``tolerance`` (default by parameter dtype: 1e-6 float64, 1e-4 float32,
    1e-2 float16) are undone and refused with the measured error. ``inplace=True`` edits ``model``."""
    _check_model(model)
    inputs = as_inputs(example_inputs)
    if zero_padding not in ("add", "refuse"):
        raise NormscopeError(f"zero_padding must be 'add' or 'refuse', got {zero_padding!r}")
    refused = _script_refusal(model)
    if refused is not None:
        return refused
    opts = Options(zero_padding=zero_padding)
    tol = default_tolerance(model) if tolerance is None else float(tolerance)
    try:
        return _fold_bn(model, inputs, inplace, opts, verify, tiny_var, tol)
    except NormscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - never a raw exception
        raise NormscopeError(
            f"folding failed ({type(exc).__name__}: {one_line(exc)}): the model was not changed "
            "(inplace=False) — please report this model"
        ) from None


def _fold_bn(
    model: nn.Module, inputs: tuple, inplace: bool, opts: Options, verify: bool, tiny_var: float, tol: float
) -> FoldResult:
    no_gate: Gate = lambda key: None  # noqa: E731
    if not verify:
        a = _fold_once(model if inplace else clone_model(model), inputs, opts, inplace, no_gate)
        return _result(a, None, tiny_var)
    x64 = _to_double(inputs)
    pre = None
    expected = None
    if not any(m.training for m in model.modules()):
        # the float64 reference run doubles as the data-flow recording when fx does not trace
        ref64 = clone_model(model).double()
        try:
            trace(ref64)
        except Exception as exc:  # noqa: BLE001 - fx raises many types on untraceable code
            try:
                dg = record(ref64, x64, seed=0)
            except Exception:  # noqa: BLE001 - reported by reference_outputs below
                dg = None
            if dg is not None:
                leaves, _ = _pytree.tree_flatten(dg.output)
                expected = [v for v in leaves if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())]
                pre = (one_line(exc), dg)
    if expected is None:
        expected = reference_outputs(model, inputs)

    def check(a: _Attempt) -> OutputError:
        try:
            return compare(expected, _run(clone_model(a.model).double(), x64))
        except Exception as exc:  # noqa: BLE001 - a fold broke the forward: the gate undoes it
            failures.append(f"{type(exc).__name__}: {one_line(exc)}")
            return OutputError(float("inf"), float("inf"), len(expected))

    failures: list[str] = []

    def attempt(gate: Gate) -> tuple[_Attempt, OutputError]:
        a = _fold_once(clone_model(model), inputs, opts, inplace, gate, pre)
        return a, check(a)

    a, err = attempt(no_gate)
    if err.max_rel > tol and a.applied:
        bad = _find_bad([(p.pair.bn, p.pair.site) for p in a.applied], attempt, tol, failures)
        a, err = attempt(lambda key: bad.get(key))
        if err.max_rel > tol:
            why = (
                f"the float64 check failed with the folds that pass one by one together "
                f"(max relative error {err.max_rel:.3g} > tolerance {tol:g}): nothing folded"
            )
            a, err = attempt(lambda key: why)
    if inplace:  # the same, deterministic, folds on the model itself
        kept = {(p.pair.bn, p.pair.site) for p in a.applied}
        gates = {s_key(s): s.reason for s in a.skipped}
        a = _fold_once(
            model,
            inputs,
            opts,
            True,
            lambda key: None if key in kept else gates.get(key, "not folded in the checked copy"),
        )
    res = _result(a, err, tiny_var)
    res.reference_outputs = expected
    return res


def s_key(s: SkippedBN) -> Key:
    return (s.bn, s.site)


def _find_bad(
    keys: list[Key], attempt: Callable[[Gate], tuple[_Attempt, OutputError]], tol: float, failures: list[str]
) -> dict[Key, str]:
    """Bisect the applied folds for those whose float64 check fails; key -> refusal reason."""
    bad: dict[Key, str] = {}

    def only(subset: list[Key]) -> float:
        allowed = set(subset)
        _, e = attempt(lambda key: None if key in allowed else "not in this trial")
        return e.max_rel

    def search(subset: list[Key], err: float) -> None:
        if len(subset) == 1:
            what = (
                f"the folded model fails on the example inputs ({failures[-1]})"
                if err == float("inf") and failures
                else f"this fold changes the output by {err:.3g} (max relative error on the example inputs) "
                f"> tolerance {tol:g}"
            )
            bad[subset[0]] = f"the float64 check failed: {what}; undone, left unfolded"
            return
        half = len(subset) // 2
        found = False
        for part in (subset[:half], subset[half:]):
            e = only(part)
            if e > tol:
                found = True
                search(part, e)
        if not found:  # only the combination fails: refuse all of them
            for k in subset:
                bad[k] = (
                    f"the float64 check failed for this fold together with {len(subset) - 1} other(s) "
                    f"(max relative error {err:.3g} > tolerance {tol:g}); undone, left unfolded"
                )

    search(keys, float("inf"))
    return bad


def _result(a: _Attempt, err: Optional[OutputError], tiny_var: float) -> FoldResult:
    risks = [_fp16(x, tiny_var) for x in a.applied]
    return FoldResult(a.model, [x.pair for x in a.applied], a.skipped, err, risks, a.path, dict(a.untraced))


def reference_outputs(model: nn.Module, inputs: tuple) -> list[Tensor]:
    """The unfolded model's outputs in float64 on the example inputs (one forward of a copy)."""
    ref = clone_model(model).double()
    try:
        return _run(ref, _to_double(inputs))
    except Exception as exc:  # noqa: BLE001 - the user's model on the user's inputs
        raise NormscopeError(
            f"the model fails on the example inputs ({type(exc).__name__}: {one_line(exc)}): "
            "check their shapes and dtypes"
        ) from None


__all__ = ["fold_bn", "output_error", "compare", "as_inputs", "default_tolerance", "reference_outputs"]
