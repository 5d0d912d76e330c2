"""The Typer application. Commands import their heavy dependencies lazily, so `moekit --help`
stays fast; `main()` builds only the command it runs (importing and converting every command's
options costs about 0.05 s of each run's start-up), `app` holds them all."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from moekit import __version__
from moekit.cli.common import STATE
from moekit.cli.help import MoekitGroup

if TYPE_CHECKING:
    app: typer.Typer

# name -> (module, attribute); `stats` is a sub-application, the others single commands
COMMANDS = {"inspect": ("moekit.cli.inspect_cmd", "inspect"),
            "profile": ("moekit.cli.profile_cmd", "profile"),
            "stats": ("moekit.cli.stats_cmd", "stats_app"),
            "prune": ("moekit.cli.prune_cmd", "prune"),
            "merge": ("moekit.cli.merge_cmd", "merge"),
            "convert": ("moekit.cli.convert_cmd", "convert"),
            "eval": ("moekit.cli.eval_cmd", "eval_model"),
            "upcycle": ("moekit.cli.upcycle_cmd", "upcycle")}


def _version(value: bool) -> None:
    if value:
        print(f"moekit {__version__}")
        raise typer.Exit()


def main_options(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks on errors (also accepted after the command).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """moekit: profile, prune, merge and upcycle MoE checkpoints."""
    STATE["debug"] = debug


def build_app(only: str | None = None) -> typer.Typer:
    """The CLI with every command, or with the command `only` alone (same options, same
    top-level flags; `moekit --help` needs them all)."""
    built = typer.Typer(name="moekit", no_args_is_help=True, add_completion=False,
                        cls=MoekitGroup,
                        help="See how MoE checkpoints use their experts, and reshape them.")
    built.callback()(main_options)
    for name, (module, attribute) in COMMANDS.items():
        if only in (None, name):
            target = getattr(importlib.import_module(module), attribute)
            if isinstance(target, typer.Typer):
                built.add_typer(target, name=name)
            else:
                built.command(name)(target)
    return built


def __getattr__(name: str) -> Any:
    """`app` (every command) is built on first use: `from moekit.cli.app import app`."""
    if name == "app":
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(name)


def main() -> None:
    """The console entry: builds only the command named on the command line."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    build_app(command if command in COMMANDS else None)()
