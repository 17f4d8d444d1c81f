"""``analyze(run, model=None, config=None)``: run every registered check, collect findings.

Checks are independent: one that cannot run becomes a :class:`Skipped` with its reason, one
that fails unexpectedly too ("check failed: ..."), and never takes the others down.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from normscope.analyze.config import Config
from normscope.analyze.context import Context
from normscope.analyze.finding import SEVERITY_RANK, Analysis, Finding, Skipped
from normscope.analyze.registry import SkipCheck, get_check, registry
from normscope.errors import NormscopeError


def as_run(run: Any):
    from normscope.store import Run, load

    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return load(run)
    raise NormscopeError(
        f"analyze() needs a Run (normscope.load(run_dir)) or a run directory path, got {type(run).__name__}."
    )


def as_config(config: Config | Mapping | None) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return Config.from_dict(config)
    raise NormscopeError(f"config must be a normscope Config or a dict of thresholds, got {type(config).__name__}.")


def _probe_reason(ctx: Context, key: str, what: str) -> str | None:
    if ctx.probe.get(key):
        return None
    if ctx.probe:
        notes = ctx.probe.get("notes")
        note = notes.get(key) if isinstance(notes, dict) else None
        return f"the probe did not measure {what}" + (f" ({note})" if note else "")
    return f"needs {what}, which only normscope.probe measures (this run has no probe.json)"


def missing(ctx: Context, need: str) -> str | None:
    """Why ``need`` (one of registry.NEEDS) is not met on this run, or None when it is."""
    if need == "training":
        if ctx.model_only:
            return "model-only probe (synthetic data, no training): nothing to judge here"
        if ctx.acts_phase == "eval" and not len(ctx.params_all):
            return "inference-only run (eval mode, no gradient, no step): nothing trained to judge"
        return None
    if need == "stats":
        return None if len(ctx.acts) else "no activation statistics in the run"
    if need == "standard-stats":
        preset = (ctx.meta.get("options") or {}).get("stats", "standard")
        if preset == "minimal":
            return "the run was recorded with watch(..., stats='minimal'): no fractions, activity or histograms"
        return None
    if need == "grads":
        return (
            None
            if len(ctx.grads)
            else "no gradient statistics in the run (watch(..., grads=False), or no backward pass)"
        )
    if need == "params":
        return None if len(ctx.params) else "no parameter statistics in the run (no optimizer step or scope.step())"
    if need == "updates":
        p = ctx.params
        if not len(p) or not p.update_norm.notna().any():
            return "no parameter updates recorded (no optimizer step, or watch(..., track_updates=False))"
        return None
    if need == "eval-loss":
        return (
            None
            if len(ctx.loss_series("eval"))
            else "no eval loss logged: give the recipe eval_data, or call scope.log(phase='eval', loss=...)"
        )
    if need == "train-loss":
        return (
            None if len(ctx.loss_series("train")) else "no train loss logged: call scope.log(loss=...) after each step"
        )
    if need == "graph":
        return (
            None
            if ctx.graph is not None
            else "no module graph: pass model= to analyze(), or record the run with normscope.probe"
        )
    if need == "probe-bn":
        return _probe_reason(ctx, "bn", "BatchNorm population statistics")
    if need == "probe-inputs":
        return _probe_reason(ctx, "inputs", "the input features' statistics")
    if need == "weights":
        if ctx.model is not None or ctx.probe.get("weights"):
            return None
        return "needs the weights: pass model= to analyze(), or record the run with normscope.probe"
    if need == "modes":
        if "modes" not in ctx.meta:
            return "no train/eval mode audit in meta.json (a run recorded before normscope 0.2): record it again"
        return None
    raise ValueError(f"unknown need {need!r}")  # registry.register refuses these


MAX_LISTED = 8  # layers named in a grouped finding's message (all are in its evidence)


def group_findings(ctx: Context, findings: list[Finding]) -> list[Finding]:
    """One finding per check and cause: findings of one check that share their fix text are one
    cause seen in several layers. The worst (highest severity, then the check's ``score`` in the
    evidence, then execution order) speaks for the group; every affected layer is listed in its
    evidence (``layers``, worst first) and named in the message; the fix text appears once."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.check, f.recommendation), []).append(f)
    out = []
    for (_, _), fs in groups.items():
        if len(fs) == 1:
            out.append(fs[0])
            continue

        def rank(f: Finding):
            score = f.evidence.get("score") if isinstance(f.evidence, dict) else None
            score = float(score) if isinstance(score, (int, float)) else 0.0
            return (SEVERITY_RANK[f.severity], -score, ctx.order(f.layer))

        fs = sorted(fs, key=rank)
        worst = fs[0]
        others = [f.layer or "the model" for f in fs[1:]]
        named = ", ".join(others[:MAX_LISTED]) + (
            f" and {len(others) - MAX_LISTED} more" if len(others) > MAX_LISTED else ""
        )
        msg = f"{worst.message} The same in {len(others)} more layer(s): {named}."
        layers = [{"layer": f.layer, "severity": f.severity, "step": list(f.step) if isinstance(f.step, tuple) else f.step,
                   "message": f.message, **({"score": f.evidence["score"]} if "score" in f.evidence else {})}
                  for f in fs]  # fmt: skip
        ev = dict(worst.evidence, layers=layers, affected_layers=len(fs))
        out.append(Finding(worst.check, worst.severity, worst.layer, worst.step, msg, ev, worst.recommendation))
    return out


def _sort_key(ctx: Context, f: Finding):
    step = f.step[0] if isinstance(f.step, tuple) else (f.step if f.step is not None else -1)
    return (SEVERITY_RANK[f.severity], ctx.order(f.layer), f.check, step)


def analyze_full(run, model=None, config: Config | Mapping | None = None, optimizer=None,
                 checks: Iterable[str] | None = None, group: bool = True) -> Analysis:  # fmt: skip
    """Run the checks on ``run`` (a Run or a run directory); findings plus skipped checks.

    ``model`` enables the structural checks from the live model (fx graph, biases, dropout
    rates); ``optimizer`` lets norm-weight-decay read param groups directly; ``checks``
    restricts to some ids; ``group=False`` keeps one finding per layer instead of one per check
    and cause.
    """
    run = as_run(run)
    cfg = as_config(config)
    ctx = Context(run, model=model, optimizer=optimizer)
    specs = registry()
    ids = sorted(specs) if checks is None else [get_check(c).id for c in checks]
    findings: list[Finding] = []
    skipped: list[Skipped] = []
    ran: list[str] = []
    for cid in ids:
        spec = specs[cid]
        if not cfg.enabled(cid):
            skipped.append(Skipped(cid, "disabled in the configuration"))
            continue
        needs = sorted(spec.needs, key=lambda n: n != "training")  # "model-only" is the clearest reason
        reason = next((r for r in (missing(ctx, n) for n in needs) if r), None)
        if reason:
            skipped.append(Skipped(cid, reason))
            continue
        try:
            out = list(spec.func(ctx, cfg.thresholds(cid)) or [])
        except SkipCheck as e:
            skipped.append(Skipped(cid, str(e)))
            continue
        except NormscopeError:
            raise
        except Exception as e:  # a bug in one check must not hide the others
            msg = f"check failed: {type(e).__name__}: {e}"
            warnings.warn(f"normscope: {cid} {msg}", stacklevel=2)
            skipped.append(Skipped(cid, msg))
            continue
        ran.append(cid)
        findings.extend(group_findings(ctx, out) if group else out)
    findings.sort(key=lambda f: _sort_key(ctx, f))
    src = ctx.__dict__.get("graph")
    return Analysis(findings, skipped, ran, str(run.run_dir), src.source if src is not None else None)


def analyze(run, model=None, config: Config | Mapping | None = None, optimizer=None,
            checks: Iterable[str] | None = None, group: bool = True) -> list[Finding]:  # fmt: skip
    """Findings for ``run``, sorted by severity (error, warning, info) then execution order.

    Use :func:`analyze_full` to also see which checks were skipped and why.
    """
    return analyze_full(run, model=model, config=config, optimizer=optimizer, checks=checks, group=group).findings
