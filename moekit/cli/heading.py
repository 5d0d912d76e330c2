"""Table titles that hold paths: rich wraps a table's title at the table's width and folds a
long word (a path) anywhere, e.g. `/tmp/run/prun` + `ed`. `headed(table)` prints the title
above the table instead, at the terminal's width, broken only after a `/` or a space."""

from __future__ import annotations

import re
from typing import Any

_BREAK = re.compile(r"(?<=[/ ])")


def wrap_at_separators(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken only after `/` or a space (a
    piece without one that is longer than `width` gets its own line, folded by the caller)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for piece in _BREAK.split(paragraph):
            if line and len(line) + len(piece.rstrip()) > width:
                lines.append(line.rstrip())
                line = ""
            line += piece
        lines.append(line.rstrip())
    return lines


class Headed:
    """`heading` (wrapped by `wrap_at_separators`), then `table`."""

    def __init__(self, heading: str, table: Any):
        self.heading, self.table = heading, table

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        style = console.get_style("table.title")
        for line in wrap_at_separators(self.heading, options.max_width):
            yield Text(line, style=style, overflow="fold")
        yield self.table


def headed(table: Any) -> Headed:
    """`table` with its title taken out and printed above it (module doc)."""
    heading, table.title = str(table.title or ""), None
    return Headed(heading, table)
