"""Typer application behind the ``normscope`` console script."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

import normscope
from normscope_cli import common as C

app = typer.Typer(
    name="normscope",
    help="Diagnostics for PyTorch training: collect per-layer statistics, find problems, fold BN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

FORMATS = ("table", "json", "junit")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"normscope {normscope.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """normscope: model analysis and diagnostics for PyTorch training."""
    C.STATE["debug"] = debug


def _is_run_dir(target: str) -> bool:
    p = Path(target)
    return p.is_dir() and (p / "meta.json").exists()


def _progress(quiet: bool, total: int):
    """A rich progress bar on stderr (step, loss, elapsed); a no-op when quiet."""
    if quiet:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), console=C.err_console(), transient=True,
    )  # fmt: skip
    task = prog.add_task("train", total=total, loss="—")

    def cb(step: int, steps: int, loss: float) -> None:
        prog.update(task, completed=step + 1, total=steps, loss=f"{loss:.4g}")

    return prog, cb


def _fold_into_run(run, model, example) -> None:
    """For a model with BatchNorm: fold it (no export), write <run_dir>/fold.json for the report."""
    import copy
    import json as _json

    import torch

    from normscope.store.writer import atomic_write_bytes

    if model is None or example is None:
        return
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    try:
        m = copy.deepcopy(model).eval()
        res = normscope.fold_bn(m, example, inplace=True)
        doc = res.to_dict()
    except Exception as e:  # noqa: BLE001 - folding is a bonus here, never a failure of inspect
        doc = {"folded": [], "skipped": [], "error": {}, "fp16_risk": [], "tracing": f"failed: {type(e).__name__}: {e}"}
    atomic_write_bytes(Path(run.run_dir) / "fold.json", _json.dumps(doc, default=str).encode())


def _example_inputs(recipe):
    """The first training batch's inputs (at most 8 samples) as a tuple of model arguments."""
    import torch

    try:
        batch = next(iter(recipe.train_data))
    except Exception:  # noqa: BLE001
        return None
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, torch.Tensor):
        return (x[:8],)
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t[:8] for t in x)
    return None


def _analyze(run, model=None, config=None, optimizer=None):
    from normscope.analyze import analyze_full

    return analyze_full(run, model=model, config=config, optimizer=optimizer)


def _write_report(run, analysis, out: Optional[Path], command: str) -> Optional[Path]:
    try:
        from normscope_reports import build_report
    except ImportError:  # the report extra is not installed
        return None
    return build_report(run, findings=analysis.findings, skipped=analysis.skipped, out=out, command=command)


def _emit_analysis(run, analysis, fmt: str, fail_on: Optional[str], quiet: bool, report: Optional[Path]) -> None:
    findings = [f.to_dict() for f in analysis.findings]
    skipped = [s.to_dict() for s in analysis.skipped]
    if fmt == "json":
        C.emit(C.to_json({
            "run_dir": str(run.run_dir), "report": str(report) if report else None, "findings": findings,
            "summary": C.summary(findings), "skipped": skipped, "checks_run": list(analysis.checks_run),
        }))  # fmt: skip
    elif fmt == "junit":
        C.emit(C.to_junit(findings, list(analysis.checks_run), skipped, fail_on, run.meta.get("name", "run")))
    elif not quiet:
        con = C.out_console()
        if findings:
            con.print(C.findings_table(findings))
        counts = C.summary(findings)
        con.print(
            f"{counts['error']} error, {counts['warning']} warning, {counts['info']} info"
            f"{f'; {len(skipped)} check(s) could not run' if skipped else ''}  —  run: {run.run_dir}"
            + (f"\nreport: {report}" if report else ""),
            markup=False,
        )
    raise typer.Exit(C.exit_code(findings, fail_on))


INSPECT_EXAMPLES = """
Examples:

  normscope inspect fixtures/dead_relu_high_lr.py

  normscope inspect my_recipes.py:resnet_recipe --steps 200 --fail-on warning

  normscope inspect models.py:build --input-shape 8,3,32,32

  normscope inspect runs/exp1 --format json > findings.json
"""


@app.command(epilog=INSPECT_EXAMPLES)
@C.handle_errors
def inspect(
    target: str = typer.Argument(..., help="A recipe (file.py, file.py:function, module:function), a model factory "
                                 "with --input-shape, or an existing run directory."),  # fmt: skip
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: the recipe's)."),
    every: int = typer.Option(1, "--every", help="Sample statistics every N steps."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<name>-<time>)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", "-s", help="Model-only probing: e.g. 8,3,32,32."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | junit (json/junit: only that on stdout)."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Exit 1 when a finding at or above info|warning|error exists."),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of check thresholds and options."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report into the run directory."),
) -> None:
    """Probe a recipe or model (or read a run), run every check, print the findings and write a report."""
    C.check_choice("format", fmt, FORMATS)
    C.check_choice("fail-on", fail_on, C.SEVERITIES)
    cfg = C.load_config(config)
    from normscope.analyze.engine import as_config

    cfg = as_config(cfg)  # validate thresholds before spending time training
    model = optimizer = None
    if _is_run_dir(target) and input_shape is None:
        run = normscope.load(target)
    elif input_shape is not None:
        from normscope.probe import probe_model
        from normscope_cli.fold_cmd import load_callable, parse_shape

        factory = load_callable(target, ("model", "build_model", "recipe_model"))
        run = probe_model(factory, parse_shape(input_shape), steps=steps or 8, run_dir=out, every=every)
    else:
        from normscope.probe import load_recipe, probe

        recipe = load_recipe(target)
        total = steps or recipe.steps
        prog, cb = _progress(quiet, total)
        if prog is not None:
            with prog:
                run = probe(recipe, steps=steps, run_dir=out, every=every, progress=cb)
        else:
            run = probe(recipe, steps=steps, run_dir=out, every=every)
        model = recipe.model
        _fold_into_run(run, model, _example_inputs(recipe))
    analysis = _analyze(run, model=model, config=cfg, optimizer=optimizer)
    path = _write_report(run, analysis, None, " ".join(["normscope", *sys.argv[1:]])) if report else None
    _emit_analysis(run, analysis, fmt, fail_on, quiet, path)


@app.command(epilog="Examples:\n\n  normscope report runs/exp1\n\n  normscope report runs/exp1 -o exp1.html")
@C.handle_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by normscope."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Report path (default RUN_DIR/report.html)."),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of check thresholds."),
) -> None:
    """(Re)build the HTML report of a run directory, with its findings."""
    run = normscope.load(run_dir)
    analysis = _analyze(run, config=C.load_config(config))
    path = _write_report(run, analysis, output, " ".join(["normscope", *sys.argv[1:]]))
    if path is None:
        C.fail("the report layer is not installed: pip install 'normscope[report]'")
    typer.echo(str(path))


@app.command(epilog="Examples:\n\n  normscope compare runs/before runs/after\n\n  normscope compare runs/a runs/b --format json")
@C.handle_errors
def compare(
    run_a: Path = typer.Argument(..., help="The baseline run directory."),
    run_b: Path = typer.Argument(..., help="The run to compare with it."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json"),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of check thresholds."),
) -> None:
    """What changed between two runs: findings per check, and key numbers per layer."""
    from normscope_cli.compare import compare_runs, render_compare

    C.check_choice("format", fmt, ("table", "json"))
    cfg = C.load_config(config)
    a, b = normscope.load(run_a), normscope.load(run_b)
    doc = compare_runs(a, b, _analyze(a, config=cfg), _analyze(b, config=cfg))
    if fmt == "json":
        C.emit(C.to_json(doc))
    else:
        render_compare(doc, C.out_console())


@app.command(epilog="Examples:\n\n  normscope checks\n\n  normscope checks dead-units")
@C.handle_errors
def checks(check_id: Optional[str] = typer.Argument(None, help="A check id: print its documentation page.")) -> None:
    """List every check (id, default severity, summary), or print one check's documentation."""
    from normscope.analyze import list_checks

    infos = list_checks()
    if check_id is None:
        from rich.table import Table

        t = Table(title=f"{len(infos)} checks")
        for col in ("id", "severity", "summary"):
            t.add_column(col, overflow="fold")
        for i in infos:
            t.add_row(i.id, f"[{C.STYLE.get(i.severity, '')}]{i.severity}[/]", C._esc(i.summary))
        C.out_console().print(t)
        return
    match = [i for i in infos if i.id == check_id]
    if not match:
        C.fail(f"no check {check_id!r}: `normscope checks` lists them")
    doc = Path(normscope.__file__).resolve().parents[1] / match[0].doc
    if doc.is_file():
        typer.echo(doc.read_text())
    else:
        info = match[0]
        typer.echo(f"# {info.id}\n\n{info.summary}\n\nDefault severity: {info.severity}\nThresholds: {info.thresholds}")


@app.command("export-tensorboard", epilog="Examples:\n\n  normscope export-tensorboard runs/exp1 tb/exp1\n\n  tensorboard --logdir tb")
@C.handle_errors
def export_tensorboard(
    run_dir: Path = typer.Argument(..., help="A run directory written by normscope."),
    logdir: Path = typer.Argument(..., help="TensorBoard log directory to write event files into."),
) -> None:
    """Write a run's scalar series and histograms as TensorBoard event files."""
    from normscope.integrations.tensorboard import export_tensorboard as export

    counts = export(run_dir, logdir)
    typer.echo(f"wrote {counts['scalars']} scalars and {counts['histograms']} histograms to {logdir}")


from normscope_cli.fold_cmd import register as _register_fold  # noqa: E402

_register_fold(app)


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="normscope")
