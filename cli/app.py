"""Typer application behind the ``normscope`` console script."""

from __future__ import annotations

import sys
from typing import Optional

import typer

import normscope

app = typer.Typer(
    name="normscope",
    help="Diagnostics for PyTorch training: collect per-layer statistics, find problems, fold BN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"normscope {normscope.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """normscope: model analysis and diagnostics for PyTorch training."""


from normscope_cli.fold_cmd import register as _register_fold  # noqa: E402

_register_fold(app)


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="normscope")
