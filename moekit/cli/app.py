"""The Typer application. Commands import their heavy dependencies lazily, so `moekit --help`
stays fast."""

from __future__ import annotations

from typing import Annotated

import typer

from moekit import __version__
from moekit.cli.common import STATE
from moekit.cli.inspect_cmd import inspect

app = typer.Typer(name="moekit", no_args_is_help=True, add_completion=False,
                  rich_markup_mode="rich",
                  help="See how MoE checkpoints use their experts, and reshape them.")


def _version(value: bool) -> None:
    if value:
        print(f"moekit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """moekit: profile, prune, merge and upcycle MoE checkpoints."""
    STATE["debug"] = debug


app.command("inspect")(inspect)


def main() -> None:
    app()
