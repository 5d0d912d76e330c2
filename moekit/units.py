"""Byte sizes as users write them (`--max-memory`, `--max-shard-size`) and as moekit prints
them. No heavy imports: the CLI parses sizes before any work starts."""

from __future__ import annotations

import math
import re

from moekit.errors import InvalidArgumentError

SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)(B?)\s*", re.IGNORECASE)


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes from `700MB`, `40GB`, `1.5TiB`, `512Mi`, `123456`: decimal units, binary with
    `i`; a unit without a number, or a size of 0 bytes, is refused naming `option`."""
    match = SIZE.fullmatch(str(text))
    if not match or (match[3] and not match[2]):
        raise InvalidArgumentError(f"{option} {text!r} is not a size",
                                   "write e.g. 700MB, 40GB or 1.5TiB (or a number of bytes)")
    base = 1024 if match[3] else 1000
    value = float(match[1]) * base ** " KMGT".index(match[2].upper() or " ")
    if not math.isfinite(value) or value >= 2 ** 63:
        shown = text if len(text) <= 20 else f"{text[:20]}..."
        raise InvalidArgumentError(f"{option} {shown!r} is too large",
                                   "write a size below 8 EiB, e.g. 40GB")
    size = int(value)
    if size <= 0:
        raise InvalidArgumentError(f"{option} must be positive, got {text!r}")
    return size


def human(nbytes: float, up: bool | None = None) -> str:
    """Decimal units, two decimals; `up` True/False rounds up/down (a limit never misstated)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            rounding = {True: math.ceil, False: math.floor, None: round}[up]
            if unit == "B":
                return f"{rounding(nbytes)} B"
            return f"{rounding(nbytes * 100) / 100:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} TB"
