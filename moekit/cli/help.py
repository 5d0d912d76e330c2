"""How every moekit command reads on a terminal, decided in one place.

- Help uses click's plain layout (no panels), at most 80 columns: docstring paragraphs are
  re-flowed to the width, `Example:` paragraphs are kept line by line as written.
- Value names read like values (`INT`, `FLOAT`, `PATH`, `TEXT`, `a|b`); flags show none;
  arguments are upper-case (`Usage: moekit prune [OPTIONS] MODEL`); rich escapes (`\\[`) go.
- `--debug` is accepted anywhere before `--`, e.g. `moekit prune ... --debug`.

`MoekitGroup` is the Typer class of the app: it gives its commands (and sub-groups such as
`moekit stats`) this behaviour, so a new command needs nothing extra.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from typer.core import TyperCommand, TyperGroup

WIDTH = 80
DEBUG = "--debug"
TYPE_NAMES = {"str": "TEXT", "int": "INT", "float": "FLOAT", "path": "PATH", "file": "FILE",
              "directory": "DIR", "bool": ""}
_TYPE = re.compile(r" <([^<>]+)>")


def value_name(label: str) -> str:
    """Typer's `<int>` / `<list[str]>` / `<a|b>` label -> `INT` / `TEXT` / `a|b`."""
    inner = label[5:-1] if label.startswith("list[") and label.endswith("]") else label
    return TYPE_NAMES.get(inner, inner if "|" in inner else inner.upper())


def _readable(text: str) -> str:
    """Replace every ` <type>` label in an option's names column."""
    return _TYPE.sub(lambda m: f" {value_name(m[1])}" if value_name(m[1]) else "", text)


def _unescape(text: str) -> str:
    """Drop rich-markup escapes (`\\[x]` -> `[x]`) from help written for rich."""
    return text.replace("\\[", "[")


def example_lines(paragraph: str, width: int) -> str:
    """Keep an example's lines as written, but break one longer than `width` at spaces into
    shell continuation lines (`... \\` then 4 spaces of indent)."""
    out = []
    for line in paragraph.splitlines():
        while len(line) > width and " " in line[4:width - 2]:
            cut = line.rindex(" ", 4, width - 2)
            out.append(line[:cut] + " \\")
            line = "    " + line[cut + 1:]
        out.append(line)
    return "\n".join(out)


_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf")


def summary(help_text: str | None) -> str:
    """The first sentence of a command's help, whole (click cuts it at ~45 characters with
    `...`): up to the first `.` outside parentheses that ends a sentence, not an abbreviation."""
    text = " ".join(inspect.cleandoc(help_text or "").partition("\f")[0].split("\n\n")[0].split())
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if (char == "." and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " ")
                and text[:i].rsplit(" ", 1)[-1].lstrip("(").lower() not in _ABBREVIATIONS):
            return _unescape(text[:i + 1])
    return _unescape(text)


def _argument_name(param: Any) -> str:
    return (param.name or "").upper() + ("..." if param.nargs != 1 else "")


class MoekitCommand(TyperCommand):
    """A command whose help reads well at 80 columns (see the module docstring)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_help_text(self, ctx: Any, formatter: Any) -> None:
        text = inspect.cleandoc(self.help or "").partition("\f")[0]
        if not text:
            return
        room = formatter.width - formatter.current_indent - 2
        paragraphs = [f"\b\n{example_lines(p, room)}" if p.lstrip().startswith("Example") else p
                      for p in text.split("\n\n")]
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(_unescape("\n\n".join(paragraphs)))

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, text = record[0], _unescape(record[1])
            if param.param_type_name == "argument":
                args.append((_argument_name(param), text.replace("  [required]", "")))
            else:
                opts.append((_readable(names), text))
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class MoekitGroup(TyperGroup):
    """The app (and its sub-groups): plain 80-column help for every command, and `--debug`
    accepted after the command name too."""

    def __init__(self, **attrs: Any) -> None:
        attrs["rich_markup_mode"] = None
        super().__init__(**attrs)
        adopt(self)

    def format_help_text(self, ctx: Any, formatter: Any) -> None:
        MoekitCommand.format_help_text(self, ctx, formatter)  # type: ignore[arg-type]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        MoekitCommand.format_options(self, ctx, formatter)  # type: ignore[arg-type]
        self.format_commands(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with its whole first sentence (`summary`), wrapped, never cut."""
        rows = [(name, command.short_help or summary(command.help))
                for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """At the top level, move `--debug` from anywhere before `--` to the front."""
        if ctx.parent is None and DEBUG in args:
            end = args.index("--") if "--" in args else len(args)
            if DEBUG in args[:end]:
                args = [DEBUG] + [a for i, a in enumerate(args) if i >= end or a != DEBUG]
        return super().parse_args(ctx, args)


def adopt(group: TyperGroup) -> None:
    """Give `group`, its commands and sub-groups (recursively) the moekit help behaviour:
    the objects keep their state, only the help methods change."""
    group.context_settings.setdefault("max_content_width", WIDTH)
    group.rich_markup_mode = None
    for command in group.commands.values():
        if isinstance(command, TyperGroup):
            command.__class__ = MoekitGroup
            adopt(command)
        elif isinstance(command, TyperCommand):
            command.__class__ = MoekitCommand
            command.context_settings.setdefault("max_content_width", WIDTH)
            command.rich_markup_mode = None
