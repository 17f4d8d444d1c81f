"""``normscope.inspect(target)``: what ``normscope inspect`` runs, as a library function.

The pipeline: **probe** (train a recipe under ``watch`` plus the measurement passes, or an
initialisation-time probe of a model on synthetic inputs, or read an existing run) → **fold**
(for models with BatchNorm: fold BN, record the result in ``fold.json`` for the report) →
**analyze** (every check) → **report** (the offline HTML file). The command line parses its
arguments, calls this, and renders the :class:`Inspection` it returns; nothing else.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normscope.errors import NormscopeError


@dataclass
class Inspection:
    """Everything one inspection produced."""

    run: Any  # normscope.store.Run
    analysis: Any  # normscope.analyze.Analysis
    model: Any = None  # the trained model (recipes) or the probed one (model-only); None for a run dir
    fold: dict | None = None  # the folding result written to fold.json, if the model has BatchNorm
    report: Path | None = None  # the HTML report, when written
    notes: list[str] = field(default_factory=list)  # what could not be done, in one line each

    @property
    def findings(self) -> list:
        return self.analysis.findings

    def to_dict(self) -> dict:
        """The JSON document of ``normscope inspect --format json``."""
        a = self.analysis
        return {
            "run_dir": str(self.run.run_dir),
            "report": str(self.report) if self.report else None,
            "findings": [f.to_dict() for f in a.findings],
            "summary": a.counts(),
            "skipped": [s.to_dict() for s in a.skipped],
            "checks_run": list(a.checks_run),
        }


def parse_shape(shape: str | Sequence[int]) -> tuple[int, ...]:
    """'1,3,224,224', '1x3x224x224' or a sequence of ints → (1, 3, 224, 224)."""
    if isinstance(shape, str):
        compact = shape.replace(" ", "")
        dims = tuple(int(p) for p in re.split(r"[,x]", compact)) if re.fullmatch(r"\d+([,x]\d+)*", compact) else ()
    else:
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise NormscopeError(f"bad input shape {shape!r}: give positive integers separated by commas, e.g. 1,3,224,224")
    return dims


def is_run_dir(target: Any) -> bool:
    if not isinstance(target, (str, os.PathLike)):
        return False
    p = Path(target)
    return p.is_dir() and (p / "meta.json").exists()


def example_inputs(recipe) -> tuple | None:
    """The first training batch's inputs (at most 8 samples) as a tuple of model arguments."""
    import torch

    try:
        batch = next(iter(recipe.train_data))
    except Exception:  # noqa: BLE001 - the user's data: folding is a bonus, never a failure
        return None
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, torch.Tensor):
        return (x[:8],)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t[:8] for t in x)
    return None


def fold_into_run(run, model, example) -> dict | None:
    """For a model with BatchNorm: fold a copy (no export) and write ``fold.json`` into the run."""
    import torch

    from normscope.fold import fold_bn
    from normscope.store.sidecars import read_fold, write_fold

    if model is None or example is None:
        return None
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    try:
        m = copy.deepcopy(model).eval()
        doc = fold_bn(m, example, inplace=True).to_dict()
    except Exception as e:  # noqa: BLE001 - folding is a bonus here, never a failure of inspect
        doc = {"folded": [], "skipped": [], "error": {}, "fp16_risk": [], "tracing": f"failed: {type(e).__name__}: {e}"}
    write_fold(run.run_dir, doc)
    return read_fold(run.run_dir)  # what the report reads back


def report_path(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Where a report goes. ``out``: that file, whose folder must exist (a typo never creates
    directories); default ``<run_dir>/report.html``, or, when that exists and ``force`` is off, the
    first free ``report-2.html``, ``report-3.html``, … (a report is never silently replaced)."""
    if out is not None:
        path = Path(out)
        if path.is_dir():
            raise NormscopeError(f"report path {path} is a directory: name a file, e.g. {path / 'report.html'}")
        if not path.parent.is_dir():
            raise NormscopeError(
                f"cannot write the report to {path}: the folder {path.parent} does not exist (create it first)"
            )
        return path
    path = Path(run_dir) / "report.html"
    n = 2
    while path.exists() and not force:
        path = Path(run_dir) / f"report-{n}.html"
        n += 1
    return path


def write_report(run, analysis, out: str | os.PathLike | None = None, command: str | None = None,
                 force: bool = False) -> Path:  # fmt: skip
    """The HTML report of ``run`` with ``analysis``'s findings (needs the ``report`` extra), at
    :func:`report_path` (an existing default report is kept unless ``force``)."""
    try:
        from normscope_reports import build_report
    except ImportError:
        raise NormscopeError("the report layer is not installed: pip install 'normscope[report]'") from None
    path = report_path(run.run_dir, out, force)
    return build_report(run, findings=analysis.findings, skipped=analysis.skipped, out=path, command=command)


def inspect(
    target: Any,
    *,
    steps: int | None = None,
    every: int = 1,
    run_dir: str | os.PathLike | None = None,
    input_shape: str | Sequence[int] | None = None,
    config: Any = None,
    report: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    command: str | None = None,
    force: bool = False,
) -> Inspection:
    """Probe, fold, analyze and report ``target``; returns an :class:`Inspection`.

    ``target``: a run directory (or :class:`~normscope.store.Run`): analyze and report it; a
    :class:`~normscope.probe.Recipe` or a recipe spec (``file.py``, ``file.py:function``,
    ``module:function``): train it for ``steps`` (default: the recipe's) sampling ``every`` step,
    then fold and analyze; with ``input_shape`` (``"8,3,32,32"``): ``target`` is a model, a model
    factory or a spec of one, probed at initialisation on synthetic inputs. ``config``: a
    :class:`~normscope.Config` or a dict of thresholds (validated before any training).
    ``report``: write ``<run_dir>/report.html`` (for an existing run whose report.html exists:
    ``report-2.html``, … unless ``force``). ``progress(step, steps, loss)`` is called after
    each training step.
    """
    from normscope.analyze.engine import analyze_full, as_config
    from normscope.store import Run, load

    cfg = as_config(config)  # bad thresholds fail before any training
    notes: list[str] = []
    model = None
    fold = None
    if input_shape is not None:
        from normscope.probe import probe_model
        from normscope.probe.recipe import resolve_callable

        shape = parse_shape(input_shape)
        factory = target
        if isinstance(target, (str, os.PathLike)):
            factory = resolve_callable(str(target), ("model", "build_model", "recipe_model"), "model",
                                       allow_bare_module=True)[0]  # fmt: skip
        run = probe_model(factory, shape, steps=steps or 8, run_dir=run_dir, every=every)
    elif isinstance(target, Run):
        run = target
    elif is_run_dir(target) or (isinstance(target, (str, os.PathLike)) and Path(target).is_dir()):
        run = load(target)  # a folder without meta.json: "not a normscope run directory"
    else:
        from normscope.probe import Recipe, load_recipe, probe

        recipe = target if isinstance(target, Recipe) else load_recipe(target)
        run = probe(recipe, steps=steps, run_dir=run_dir, every=every, progress=progress)
        model = recipe.model
        fold = fold_into_run(run, model, example_inputs(recipe))
    analysis = analyze_full(run, model=model, config=cfg)
    path = None
    if report:
        try:
            path = write_report(run, analysis, None, command, force=force)
        except NormscopeError as e:
            if "not installed" not in str(e):
                raise
            notes.append(str(e))
            warnings.warn(f"normscope: no HTML report: {e}", stacklevel=2)
    return Inspection(run, analysis, model=model, fold=fold, report=path, notes=notes)
