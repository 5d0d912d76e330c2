"""Shared CLI pieces: the console, error rendering, option aliases, table export."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from moekit.calib.spec import DataSpec
    from moekit.runtime.options import RunOptions

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)
STATE: dict[str, Any] = {"debug": False}
NOTES: list[str] = []  # printed after a command succeeds (`handle_errors`), e.g. renamed meanings
F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id (org/name).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
MaybeOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder.")]
PlanOutOpt = Annotated[Path | None, typer.Option("--plan-out", help="Write the plan JSON.")]
DomainOpt = Annotated[str, typer.Option("--domain", help="Which domain's statistics to use.")]
IgnoreFingerprintOpt = Annotated[bool, typer.Option(
    "--ignore-fingerprint", help="Accept stats/plan whose model hash differs.")]
MaxShardSizeOpt = Annotated[str, typer.Option("--max-shard-size", help="e.g. 5GB, 500MB.")]
ProtectSuperOpt = Annotated[bool, typer.Option(
    "--protect-super/--no-protect-super", help="Never drop or fold super experts (outstanding "
    "max_norm).")]
# The run/data options every command that runs a model takes, with one name, help text and
# meaning each (docs/options.md; tests/cli/test_cli_options.py checks commands and table agree).
DataOpt = Annotated[list[str] | None, typer.Option(
    "--data", "-d", help="NAME=PATH of a text/JSONL/JSON/Parquet file or folder, one dataset "
    "each; repeat for several. Default (profile, eval, merge): the texts in sample_data/ "
    "(docs/options.md).")]
RangeOpt = Annotated[str | None, typer.Option(
    "--data-range", help="START:END fraction of each dataset, e.g. 0:0.5 (first half).")]
TextFieldOpt = Annotated[str, typer.Option(
    "--text-field", help="Field holding the text in JSON/JSONL/Parquet.")]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", help="Tokenizer folder or repo when the model has none.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-tokens", help="Tokens read in total over all --data sources, an equal share from "
    "each. Default: the command's budget (docs/options.md).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Dtype the model runs in: auto (float32 on a CPU, the checkpoint's on "
    "a GPU), float32, bfloat16, float16.")]
MaxMemoryOpt = Annotated[str, typer.Option(
    "--max-memory", help="Weight memory the run may hold on its device, e.g. 700MB, 40GB: "
    "larger checkpoints are streamed layer by layer. auto: 80% of the free RAM/VRAM.")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow running Python code shipped inside the checkpoint "
    "(auto_map). Off by default: moekit refuses such checkpoints in one line.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward.")]
# Exports: `--export FILE` in every command that prints a table (the old spellings still work
# for one release, hidden, with a note: `renamed`).
OldExportTableOpt = Annotated[Path | None, typer.Option(
    "--export-table", hidden=True, help="Old spelling of --export.")]
OldReportOpt = Annotated[Path | None, typer.Option(
    "--report", hidden=True, help="Old spelling of --export.")]

PlotsOpt = Annotated[bool, typer.Option("--plots/--no-plots",
                                        help="Write PNG plots, report.md and report.html.")]
PlotLayerOpt = Annotated[int | None, typer.Option(
    "--plot-layer", help="Layer for the co-activation plot (default: the most uneven).")]
ExportOpt = Annotated[Path | None, typer.Option(
    "--export", help="Also write the per-layer table as .csv/.parquet/.json.")]
ColdestOpt = Annotated[Path | None, typer.Option(
    "--export-coldest", help="Also write the coldest-experts table as .csv/.parquet/.json.")]


def handle_errors(func: F) -> F:
    """Turn library errors into one red line and exit code 2 (traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moekit.errors import MoekitError
        from moekit.io.output import stop_signals_raise

        NOTES.clear()
        try:
            with stop_signals_raise():
                single_process(func)
                result = func(*args, **kwargs)
                for note in NOTES:  # after the work: an error stays the one line on stderr
                    err_console.print(f"note: {note}", soft_wrap=True)
                sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
                return result
        except BrokenPipeError:  # `moekit ... | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE, as a process killed by it
        except MoekitError as err:
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt as err:  # Ctrl-C, and SIGTERM/SIGHUP as moekit.errors.Terminated
            signum = getattr(err, "signum", 2)
            name = {1: "SIGHUP", 2: "Ctrl-C", 15: "SIGTERM"}.get(signum, f"signal {signum}")
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says so
                err_console.print(f"[bold red]interrupted[/] ({name}): no output was left "
                                  "behind")
            sys.exit(128 + signum)
        except Exception as err:  # noqa: BLE001 - last resort: one line, details with --debug
            if STATE["debug"]:
                raise
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                err_console.print(f"[bold red]error:[/] {escape(str(err))} (free space on that "
                                  "disk or write elsewhere)", soft_wrap=True)
                sys.exit(2)  # a side file; outputs are staged and raise DiskFullError
            first = (str(err).strip().splitlines() or [""])[0]
            err_console.print(f"[bold red]error:[/] {type(err).__name__}: {escape(first)} "
                              "(run with --debug for the traceback)", soft_wrap=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def check_context(path: Path, *windows: tuple[str, int, int]) -> None:
    """Refuse each `(option, value, default)` window longer than the model's context
    (`max_position_embeddings`), before any forward. A default is let through: the tiny test
    models' context is below it, real ones are not."""
    from moekit.errors import InvalidArgumentError
    from moekit.io.reader import load_config

    config = load_config(path)
    context = config.get("max_position_embeddings",
                         (config.get("text_config") or {}).get("max_position_embeddings"))
    if not isinstance(context, int) or isinstance(context, bool):
        return
    for option, value, default in windows:
        if value > context and value != default:
            raise InvalidArgumentError(
                f"{option} {value} is past the context of {path.name or path} "
                f"(max_position_embeddings {context}): positions beyond it were never trained",
                f"pass {option} {context} or less")


def warn_uncopied(source: Path) -> None:
    """Announce the tokenizer/aux files the output will lack (links that leave `source`)."""
    from moekit.io.output import uncopied_aux_files

    for name in uncopied_aux_files(source):
        err_console.print(f"[bold yellow]warning:[/] {escape(str(Path(source) / name))} links "
                          "outside the model folder (or is not a regular file): it is not "
                          "copied into the output; copy the file itself into the folder to keep "
                          "it", soft_wrap=True)


def single_process(func: Callable[..., Any]) -> None:
    """Refuse a command that is not data-parallel (all but profile and eval) under torchrun:
    rank 0 says so in one line, the other ranks leave with exit 2 silently."""
    from moekit.errors import InvalidArgumentError
    from moekit.runtime.distributed import launched_by_torchrun

    if getattr(func, "data_parallel", False) or not launched_by_torchrun():
        return
    if os.environ.get("RANK") != "0":
        sys.exit(2)
    group = func.__module__.rpartition(".")[2].removesuffix("_cmd")
    name = " ".join(dict.fromkeys(["moekit", group, func.__name__]))
    raise InvalidArgumentError(
        f"{name} does not run data-parallel, but torchrun started it on "
        f"{os.environ.get('WORLD_SIZE')} processes (WORLD_SIZE)",
        "run it as one process: python -m moekit ...; only profile and eval split their "
        "data across torchrun ranks")


def load_model_path(model: str, revision: str | None = None) -> Path:
    from moekit.io.source import resolve_source

    return resolve_source(model, revision)


def export_table(frame: Any, path: Path) -> None:
    """Write a pandas DataFrame as CSV, Parquet or JSON, chosen by the file extension."""
    from moekit.errors import InvalidArgumentError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()  # checked before the work by moekit.io.output.check_outputs
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".json":
        frame.to_json(path, orient="records", indent=2)
    else:
        raise InvalidArgumentError(f"cannot write a table as '{suffix or path.name}'",
                                   "use a .csv, .parquet or .json file name")


def moe_layout(source: Path) -> tuple[Any, Any, str]:
    """(Checkpoint, layout, fingerprint) of a MoE checkpoint; dense ones are refused."""
    from moekit.errors import InvalidArgumentError
    from moekit.families.fingerprint import model_fingerprint
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint

    checkpoint = Checkpoint(source)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise InvalidArgumentError(f"{source} is a dense model ({layout.resolved.family.name}): "
                                   "nothing to prune")
    return checkpoint, layout, model_fingerprint(checkpoint, layout)


def local_inputs(*paths: Path | str | None, data: list[str] | None = None) -> tuple[Path, ...]:
    """Every local input of a command for `moekit.io.output.check_outputs`: the given paths
    (a string such as `--tokenizer` only when it names a local file or folder, not a repo id)
    and each `--data` value's file or folder (parsed, so an empty path is refused here)."""
    from moekit.calib.data import DataSource

    found = [Path(p) for p in paths if p is not None and (not isinstance(p, str)
                                                          or Path(p).exists())]
    return (*found, *(DataSource.parse(v).path for v in data or ()))


MIN_CALIB_TOKENS = 64  # `prune --data` / `merge --data`: fewer cannot rank experts
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_early(device: str | None = None, max_memory: str | None = None,
                minimums: tuple[tuple[str, int | None, int], ...] = (),
                choices: tuple[tuple[str, str | None, tuple[str, ...]], ...] = ()) -> None:
    """Option values that need no model, checked before any work: `--device` names a device
    moekit can run on, `--max-memory` is `auto` or a size, every `(option, value, minimum)`
    given (value not None) is at least its minimum, and every `(option, value, allowed)` given
    is one of the allowed names."""
    from moekit.errors import InvalidArgumentError
    from moekit.units import parse_size

    if device is not None and not DEVICE.fullmatch(device):
        raise InvalidArgumentError(f"--device {device!r} is not a device moekit can run on",
                                   "use auto, cpu, cuda, cuda:N, xpu or mps")
    if max_memory is not None and max_memory != "auto":
        parse_size(max_memory, "--max-memory")
    for option, name, allowed in choices:
        if name is not None and name not in allowed:
            raise InvalidArgumentError(f"unknown {option} {name!r}",
                                       f"use one of {', '.join(allowed)}")
    for option, value, minimum in minimums:
        if value is not None and value < minimum:
            raise InvalidArgumentError(f"{option} must be at least {minimum}, got {value}",
                                       f"pass {option} {minimum} or more, or leave it out "
                                       "for the default")


# Commands whose --max-tokens counted per source (or fitted positions) until 0.1.0: the note of
# `run_data_options`, printed when the option is given, for one release.
OLD_MAX_TOKENS = {
    "profile": "per data source", "eval": "per dataset", "upcycle": "per data source",
    "prune": "the fitted positions per layer (the held-out scoring slice came on top)"}


def run_data_options(ctx: typer.Context, *, device: str, dtype: str, max_memory: str,
                     trust_remote_code: bool, data: list[str] | None, data_range: str | None,
                     text_field: str, tokenizer: str | None, seq_len: int,
                     max_tokens: int | None, min_tokens: int = 2
                     ) -> tuple[RunOptions, DataSpec]:
    """The (RunOptions, DataSpec) records of a command that runs a model, built once from the
    shared options and checked before any work: `--device`, `--dtype`, `--max-memory`, each
    `--data` path present, `--data-range`, `--seq-len` >= 2 and `--max-tokens` >= `min_tokens`.
    A `--max-tokens` given on the command line of a command whose meaning changed gets a
    one-line note once the command succeeded, where the change alters what is read (`prune`;
    the others with several sources; `OLD_MAX_TOKENS`); `ctx`: the running command's
    context."""
    from moekit.calib.data import DataSource, parse_fraction
    from moekit.calib.spec import DataSpec
    from moekit.errors import DataError
    from moekit.runtime.loading import DTYPES
    from moekit.runtime.options import RunOptions

    check_early(device, max_memory, (("--max-tokens", max_tokens, min_tokens),
                                     ("--seq-len", seq_len, 2)), (("--dtype", dtype, DTYPES),))
    fraction = parse_fraction(data_range)
    sources = tuple(DataSource.parse(v) for v in data or ())
    for source in sources:
        if not source.path.exists():
            raise DataError(f"--data file {source.path} does not exist")
    spec = DataSpec(sources, fraction, text_field, tokenizer, seq_len, max_tokens)
    command = ctx.info_name or ""
    origin = ctx.get_parameter_source("max_tokens")
    given = getattr(origin, "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    changed = command == "prune" or len(spec.sources or (None, None)) > 1
    if max_tokens is not None and command in OLD_MAX_TOKENS and given and changed:
        NOTES.append(f"--max-tokens {max_tokens} counted the tokens read in total over all "
                     f"--data sources, an equal share from each; until moekit 0.1.0 {command} "
                     f"counted {OLD_MAX_TOKENS[command]} (docs/options.md)")
    return RunOptions(device, dtype, max_memory, trust_remote_code), spec


def renamed(value: Any, old_value: Any, old: str, new: str = "--export") -> Any:
    """The value of option `new`, given under its old spelling `old` (kept for one release,
    with a one-line note once the command succeeded); both at once are refused."""
    from moekit.errors import InvalidArgumentError

    if old_value is None:
        return value
    if value is not None:
        raise InvalidArgumentError(f"{old} and {new} are both given",
                                   f"{old} is the old spelling of {new}: give {new} only")
    NOTES.append(f"{old} is now {new}; the old spelling still works in this release")
    return old_value
