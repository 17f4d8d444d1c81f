"""Typer application behind the ``normscope`` console script."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core

import normscope
from normscope_cli import common as C


def _no_type_for_flags() -> None:
    """Plain flags (--quiet, --force, --help) take no value: typer's help would show ``<bool>``."""
    cls = typer.core.TyperOption
    if getattr(cls.display_type_rich, "_normscope", False):
        return
    orig = cls.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else orig(self, ctx)

    display_type_rich._normscope = True
    cls.display_type_rich = display_type_rich


_no_type_for_flags()

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
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """normscope: model analysis and diagnostics for PyTorch training."""
    C.STATE["debug"] = debug


class _Progress:
    """A rich progress bar on stderr (step, loss, elapsed), shown from the first training step on
    (so errors before training stay one line); a no-op when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.prog = None

    def __call__(self, step: int, steps: int, loss: float) -> None:
        if self.quiet:
            return
        if self.prog is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.prog = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(), console=C.err_console(), transient=True,
            )  # fmt: skip
            self.task = self.prog.add_task("train", total=steps, loss="—")
            self.prog.start()
        self.prog.update(self.task, completed=step + 1, total=steps, loss=f"{loss:.4g}")

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.prog is not None:
            self.prog.stop()


def _analyze(run, config=None):
    from normscope.analyze import analyze_full

    return analyze_full(run, config=config)


def _emit(result, fmt: str, fail_on: Optional[str], quiet: bool) -> None:
    run, analysis, report = result.run, result.analysis, result.report
    findings = [f.to_dict() for f in analysis.findings]
    skipped = [s.to_dict() for s in analysis.skipped]
    if fmt == "json":
        C.emit(C.to_json(result.to_dict()))
    elif fmt == "junit":
        C.emit(C.to_junit(findings, list(analysis.checks_run), skipped, fail_on, run.meta.get("name", "run")))
    elif not quiet:
        con = C.out_console()
        if findings:
            con.print(C.findings_table(findings))
        counts = C.summary(findings)
        state = run.state
        if state["state"] == "incomplete":
            con.print(f"run {state['text']}", markup=False)
        if report and report.name != "report.html":
            con.print(f"{report.parent / 'report.html'} kept; the new report is {report.name} (--force replaces it)",
                      markup=False)  # fmt: skip
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
    target: str = typer.Argument(
        ...,
        help="A recipe (file.py, file.py:function, module:function), a model factory "
        "with --input-shape, or an existing run directory.",
    ),  # fmt: skip
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: the recipe's)."),
    every: int = typer.Option(1, "--every", help="Sample statistics every N steps."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<name>-<time>)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", "-s", help="Model-only probing: e.g. 8,3,32,32."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | junit (json/junit: only that on stdout)."),
    fail_on: Optional[str] = typer.Option(
        None, "--fail-on", help="Exit 1 when a finding at or above info|warning|error exists."
    ),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of check thresholds and options."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report into the run directory."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing RUN_DIR/report.html (default: write report-2.html, …)."
    ),
) -> None:
    """Probe a recipe or model (or read a run), run every check, print the findings and write a report."""
    C.check_choice("format", fmt, FORMATS)
    C.check_choice("fail-on", fail_on, C.SEVERITIES)
    cfg = C.load_config(config)
    with _Progress(quiet) as progress:
        result = normscope.inspect(target, steps=steps, every=every, run_dir=out, input_shape=input_shape, config=cfg,
                                   report=report, progress=progress, command=" ".join(["normscope", *sys.argv[1:]]),
                                   force=force)  # fmt: skip
    _emit(result, fmt, fail_on, quiet)


@app.command(epilog="Examples:\n\n  normscope report runs/exp1\n\n  normscope report runs/exp1 -o exp1.html")
@C.handle_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by normscope."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Report file, in an existing folder (default RUN_DIR/report.html)."
    ),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of check thresholds."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing RUN_DIR/report.html (default: write report-2.html, …)."
    ),
) -> None:
    """(Re)build the HTML report of a run directory, with its findings."""
    run = normscope.load(run_dir)
    normscope.pipeline.report_path(run_dir, output, force)  # a bad -o fails before the analysis
    analysis = _analyze(run, config=C.load_config(config))
    cmd = " ".join(["normscope", *sys.argv[1:]])
    typer.echo(str(normscope.pipeline.write_report(run, analysis, output, cmd, force=force)))


@app.command(
    epilog="Examples:\n\n  normscope compare runs/before runs/after\n\n  normscope compare runs/a runs/b --format json"
)
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


@app.command(
    "export-tensorboard",
    epilog="Examples:\n\n  normscope export-tensorboard runs/exp1 tb/exp1\n\n  tensorboard --logdir tb",
)
@C.handle_errors
def export_tensorboard(
    run_dir: Path = typer.Argument(..., help="A run directory written by normscope."),
    logdir: Path = typer.Argument(..., help="TensorBoard log directory to write event files into."),
) -> None:
    """Write a run's scalar series and histograms as TensorBoard event files."""
    from normscope.integrations.tensorboard import export_tensorboard as export

    counts = export(run_dir, logdir)
    typer.echo(f"wrote {counts['scalars']} scalars and {counts['histograms']} histograms to {logdir}")


@app.command(
    epilog="Examples:\n\n  normscope top runs/exp1\n\n  normscope top runs/exp1 --refresh 5",
)
@C.handle_errors
def top(
    run_dir: Path = typer.Argument(..., help="A run directory being written by normscope.watch (or a finished one)."),
    refresh: float = typer.Option(2.0, "--refresh", help="Seconds between re-reads of the run directory."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop following after this many seconds."),
) -> None:
    """Follow a run live: steps, loss, current findings and the worst layers per check, until it ends."""
    from normscope_cli.top import follow

    if not refresh > 0:
        C.fail(f"--refresh must be a positive number of seconds, got {refresh}")
    normscope.load(run_dir)  # not a run directory: one line, before the live view starts
    snap = follow(run_dir, refresh, C.out_console(), timeout)
    st = snap["state"]
    if st["state"] == "running":
        typer.echo(f"stopped following after --timeout; the run is still being written: {run_dir}")


@app.command(
    "build-kernel",
    epilog="Examples:\n\n  normscope build-kernel\n\n  NORMSCOPE_KERNEL=off python train.py   # never use it",
)
@C.handle_errors
def build_kernel(
    verbose: bool = typer.Option(False, "--verbose", help="Show the compiler's commands and output."),
) -> None:
    """Build the fused CPU reduction for this machine now (needs a C++ compiler; cached, ~35 s once).

    Without it the collector computes the same statistics with torch ops, at more cost per hooked
    tensor on the CPU; with NORMSCOPE_KERNEL=auto (the default) a run that finds no build starts
    one in the background for the runs after it."""
    from normscope.collect import native

    try:
        path = native.build(verbose=verbose)
    except Exception as e:
        C.fail(f"the fused CPU kernel did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}); "
               "install a C++ compiler (g++) and ninja, or keep the torch path (same statistics, slower)")  # fmt: skip
    typer.echo(f"fused CPU kernel ready: {path}")


from normscope_cli.fold_cmd import register as _register_fold  # noqa: E402

_register_fold(app)


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="normscope")
