"""Output folders that appear whole or not at all: written in a hidden sibling, renamed at the
end, never on top of the input."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.errors import InvalidArgumentError, OutputExistsError

# Files copied from the source checkpoint into every output (tokenizer, generation, templates).
AUX_SUFFIXES = (".jinja", ".tiktoken", ".model", ".txt", ".py")
AUX_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json",
             "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
             "processor_config.json", "LICENSE", "LICENSE.txt", "NOTICE")


def check_output(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Fail early when `out` cannot be written: it is non-empty (without `overwrite`), or it is
    (or contains) an input folder."""
    out = Path(out)
    resolved = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(
                source):
            raise InvalidArgumentError(f"output folder {out} overlaps the input {source}",
                                       "choose an output folder outside the input checkpoint")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder",
                                "choose another --out path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} exists and is not empty",
                                "choose another --out or pass --overwrite")


@contextmanager
def staged_output(out: Path, overwrite: bool = False,
                  inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is
    removed, so an interrupted run never leaves a half-written output that looks valid."""
    out = Path(out)
    check_output(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.moekit-partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        retired = out.parent / f".{out.name}.moekit-old-{os.getpid()}"
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def copy_aux_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer, generation-config, chat-template and licence files. Returns their names."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and (path.name in AUX_NAMES or path.suffix in AUX_SUFFIXES):
            shutil.copyfile(path, Path(dest) / path.name)
            copied.append(path.name)
    return copied
