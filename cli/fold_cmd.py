"""``normscope fold``: fold BN, export to ONNX, verify, and report.

    normscope fold TARGET --input-shape 1,3,224,224 -o model.onnx [--recalibrate RECIPE]
                   [--format table|json] [--no-verify] [--force]

TARGET is ``path.py[:function]`` or ``package.module[:function]``; the function (default
``model`` or ``build_model``) returns an ``nn.Module``, which is put in eval mode. RECIPE is a
Python file (or module:function) whose ``recipe()`` returns a ``normscope.Recipe``; the inputs of its ``train_data`` (an
iterable of ``(inputs, targets)`` batches) recalibrate BN first (PreciseBN).
Exit codes: 0 success, 1 verification failed (the ONNX file is then not written, unless
``--force``), 2 bad input.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from normscope.errors import NormscopeError

TOLERANCE = 1e-4


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' → (1, 3, 224, 224) (one parser: normscope.pipeline's)."""
    from normscope.pipeline import parse_shape as parse

    try:
        return parse(text)
    except NormscopeError:
        raise NormscopeError(
            f"bad --input-shape {text!r}: give positive integers separated by commas, e.g. 1,3,224,224"
        ) from None


def load_callable(spec: str, defaults: tuple[str, ...]) -> Callable[[], Any]:
    """``path.py:function``, ``path.py`` (first of ``defaults``), ``pkg.module[:function]``."""
    from normscope.probe.recipe import resolve_callable

    return resolve_callable(spec, defaults, "model", allow_bare_module=True)[0]


def _call(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise NormscopeError(f"calling {what} failed: {type(exc).__name__}: {exc}") from None


def _recalibrate(model: Any, recipe_spec: str, max_batches: int) -> Any:
    from normscope.fold import recalibrate_bn
    from normscope.probe import load_recipe

    data = load_recipe(recipe_spec).train_data

    def inputs(batch: Any) -> Any:
        return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch

    return recalibrate_bn(model, data, input_fn=inputs, max_batches=max_batches)


def run_fold(
    target: str,
    shapes: list[str],
    output: Optional[Path],
    recalibrate: Optional[str],
    recalibrate_batches: int,
    verify: bool,
    exporter: str,
    zero_padding: str,
    force: bool = False,
) -> dict[str, Any]:
    import torch
    from torch import nn

    from normscope.fold import export_onnx, fold_bn

    parsed = [parse_shape(s) for s in shapes]
    model = _call(load_callable(target, ("model", "build_model")), target)
    if not isinstance(model, nn.Module):
        raise NormscopeError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    report: dict[str, Any] = {"target": target, "input_shapes": [list(s) for s in parsed]}
    if recalibrate:
        report["recalibration"] = _recalibrate(model, recalibrate, recalibrate_batches).to_dict()
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=gen) for s in parsed)
    if output is not None:
        res = export_onnx(
            model,
            inputs,
            output,
            fold=True,
            verify=verify,
            exporter=exporter,
            tolerance=TOLERANCE,
            zero_padding=zero_padding,
            force=force,
        )
        report["fold"] = res.fold.to_dict() if res.fold else None
        report["export"] = {k: v for k, v in res.to_dict().items() if k != "fold"}
        report["ok"] = res.verified is not False
    else:
        fold = fold_bn(model, inputs, zero_padding=zero_padding, verify=verify)
        report["fold"] = fold.to_dict()
        report["ok"] = fold.error is None or fold.error.max_rel <= TOLERANCE
    return report


def _fmt(x: Any) -> str:
    return "–" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def render_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    fold = report["fold"]
    con.print(
        f"[bold]normscope fold[/bold] {report['target']}  inputs {report['input_shapes']}  tracing: {fold['tracing']}"
    )
    how = "recorded from one real forward (fx could not trace it)" if fold["tracing"] == "dataflow" else "not traced"
    for path, why in fold.get("untraced", {}).items():
        con.print(f"  {how}: {path or '(whole model)'}: {why}")
    if "recalibration" in report:
        r = report["recalibration"]
        con.print(
            f"recalibrated {len(r['bns'])} BN on {r['batches']} batches ({r['samples']} samples)"
            + (f", reused: {r['reused']}" if r["reused"] else "")
        )
    table = Table(title=f"Folded ({len(fold['folded'])})")
    for col in ("BN", "into", "pattern", "role"):
        table.add_column(col)
    for p in fold["folded"]:
        into = p["layer"] + (f" (copy of {p['copy_of']})" if p.get("copy_of") else "")
        table.add_row(p["bn"], into, p["pattern"], p["role"])
    con.print(table)
    if fold["skipped"]:
        table = Table(title=f"Skipped ({len(fold['skipped'])})")
        table.add_column("BN")
        table.add_column("reason")
        for s in fold["skipped"]:
            table.add_row(s["bn"], s["reason"])
        con.print(table)
    risky = [r for r in fold["fp16_risk"] if r["exceeds_fp16"] or r["tiny_var_channels"]]
    if risky:
        table = Table(title="fp16 risk (|value| > 65504 or σ² < 1e-6)")
        for col in ("layer", "BN", "max |W′|", "max |b′|", "max s", "σ²≈0 channels", "> fp16"):
            table.add_column(col)
        for r in risky:
            table.add_row(
                r["layer"],
                r["bn"],
                _fmt(r["max_abs_weight"]),
                _fmt(r["max_abs_bias"]),
                _fmt(r["max_scale"]),
                ", ".join(map(str, r["tiny_var_channels"][:8])) or "–",
                "yes" if r["exceeds_fp16"] else "no",
            )
        con.print(table)
    elif fold["fp16_risk"]:
        peak = max(max(r["max_abs_weight"], r["max_abs_bias"]) for r in fold["fp16_risk"])
        con.print(f"fp16: largest folded |value| {peak:.3g}, no σ² ≈ 0 channel: within range")
    if fold.get("error"):
        e = fold["error"]
        con.print(
            f"folded vs unfolded (float64, example inputs): max abs {_fmt(e['max_abs'])}, max rel {_fmt(e['max_rel'])}"
        )
    if "export" in report:
        x = report["export"]
        con.print(f"ONNX: {x['path']} ({x['exporter']} exporter), BatchNormalization nodes left: {x['bn_nodes_left']}")
        if x.get("exporter_error"):
            con.print(f"  the dynamo exporter failed ({x['exporter_error']}); fell back to TorchScript")
        for note in x.get("notes", []):
            con.print(f"  [yellow]note:[/yellow] {note}")
        if x["verified"] is not None:
            status = "[green]OK[/green]" if x["verified"] else "[red]FAILED[/red]"
            con.print(
                f"onnxruntime (no optimisation) vs unfolded PyTorch: max abs {_fmt(x['max_abs_err'])}, "
                f"max rel {_fmt(x['max_rel_err'])} (tolerance {x['tolerance']:g}) {status}"
            )


def fold_command(
    target: str = typer.Argument(..., help="path.py[:function] or module[:function] returning an nn.Module"),
    input_shape: list[str] = typer.Option(
        ..., "--input-shape", "-s", help="e.g. 1,3,224,224; repeat for several inputs"
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the folded model to this .onnx file"),
    recalibrate: Optional[str] = typer.Option(
        None, "--recalibrate", help="recipe file whose train_data recalibrates BN first"
    ),
    recalibrate_batches: int = typer.Option(50, "--recalibrate-batches", help="at most this many batches"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="compare against the unfolded model"),
    exporter: str = typer.Option("auto", "--exporter", help="auto, dynamo or torchscript"),
    zero_padding: str = typer.Option("add", "--zero-padding", help="BN → zero-padded conv: add or refuse"),
    force: bool = typer.Option(False, "--force", help="write the ONNX file even when its verification fails"),
) -> None:
    """Fold BatchNorm exactly, export to ONNX and verify it; refused pairs come with a reason."""
    from normscope.fold import VerificationError

    try:
        if fmt not in ("table", "json"):
            raise NormscopeError(f"--format must be table or json, got {fmt!r}")
        if exporter not in ("auto", "dynamo", "torchscript"):
            raise NormscopeError(f"--exporter must be auto, dynamo or torchscript, got {exporter!r}")
        if zero_padding not in ("add", "refuse"):
            raise NormscopeError(f"--zero-padding must be add or refuse, got {zero_padding!r}")
        quiet = contextlib.redirect_stdout(sys.stderr) if fmt == "json" else contextlib.nullcontext()
        with quiet:  # in JSON mode stdout carries only the JSON
            report = run_fold(
                target, input_shape, output, recalibrate, recalibrate_batches, verify, exporter, zero_padding, force
            )
    except VerificationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except NormscopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        render_table(report)
    if not report["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``fold`` command to the ``normscope`` typer app."""
    app.command(
        "fold",
        epilog="Examples:\n\n  normscope fold fixtures/deploy_models.py:resnet_tiny -s 1,3,32,32 -o model.onnx\n\n"
        "  normscope fold models.py:build -s 1,3,224,224 -o m.onnx --recalibrate recipe.py --format json",
    )(fold_command)
