"""Progress bars of the commands (stderr, transient, off when stderr is not a terminal):
bytes written (prune, merge, convert), tokens evaluated (eval, --eval-data) and tokens profiled
(profile, with its rate)."""

from __future__ import annotations

from moekit.cli.common import err_console


class byte_progress:  # noqa: N801 - used like a function in `with`
    """A rich progress bar of bytes written, fed by `on_bytes(advance, total)` (stderr)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress("writing", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=err_console, transient=True,
                                 disable=not err_console.is_terminal)
        self.task = self.progress.add_task("write", total=None)

    def __enter__(self):  # noqa: ANN204
        self.progress.start()
        return lambda advance, total: self.progress.update(self.task, advance=advance,
                                                           total=total)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class token_progress:  # noqa: N801 - used like a function in `with`
    """A rich progress bar fed by `on_tokens(advance, total)` callbacks (stderr)."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.progress = Progress("[progress.description]{task.description}", BarColumn(),
                                 MofNCompleteColumn(), "tokens", TimeElapsedColumn(),
                                 console=err_console, transient=True,
                                 disable=not err_console.is_terminal)
        self.label = label
        self.task = self.progress.add_task(f"{label} (loading model and data)", total=None)

    def __enter__(self):  # noqa: ANN204
        self.progress.start()
        return self.update

    def update(self, advance: int, total: int) -> None:
        label = self.label if advance else None  # tokens flow: loading is over
        self.progress.update(self.task, advance=advance, total=total, description=label)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class TokenProgress:
    """A rich progress bar with tokens/s, fed by profile_model's progress callback (stderr)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("tokens"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err_console, transient=True, disable=not err_console.is_terminal)
        self.task = self.progress.add_task("loading model and data", total=None, rate="")

    def __enter__(self) -> TokenProgress:
        self.progress.start()
        return self

    def __call__(self, event: str, tokens: int, domain: str) -> None:
        if event == "start":
            self.progress.update(self.task, total=tokens, description="profiling")
            return
        if event == "mode":
            self.progress.console.print(domain)
            return
        if event == "ablation":  # domain = "<method> <steps in all>"
            what, steps = domain.rsplit(" ", 1)
            self.progress.update(self.task, completed=tokens, total=int(steps),
                                 description=f"ablation ({what})", rate="")
            return
        self.progress.update(self.task, advance=tokens, description=f"profiling {domain}")
        speed = self.progress.tasks[0].speed
        if speed:
            self.progress.update(self.task, rate=f"{speed:,.0f} tok/s")

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
