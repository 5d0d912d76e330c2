"""The Typer application. Commands import their heavy dependencies lazily, so `moekit --help`
stays fast."""

from __future__ import annotations

from typing import Annotated

import typer

from moekit import __version__
from moekit.cli.common import STATE
from moekit.cli.eval_cmd import eval_model
from moekit.cli.help import MoekitGroup
from moekit.cli.inspect_cmd import inspect
from moekit.cli.merge_cmd import merge
from moekit.cli.profile_cmd import profile
from moekit.cli.prune_cmd import prune
from moekit.cli.stats_cmd import stats_app
from moekit.cli.upcycle_cmd import upcycle

app = typer.Typer(name="moekit", no_args_is_help=True, add_completion=False, cls=MoekitGroup,
                  help="See how MoE checkpoints use their experts, and reshape them.")


def _version(value: bool) -> None:
    if value:
        print(f"moekit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks on errors (also accepted after the command).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """moekit: profile, prune, merge and upcycle MoE checkpoints."""
    STATE["debug"] = debug


app.command("inspect")(inspect)
app.command("profile")(profile)
app.add_typer(stats_app, name="stats")
app.command("prune")(prune)
app.command("merge")(merge)
app.command("eval")(eval_model)
app.command("upcycle")(upcycle)


def main() -> None:
    app()
