"""Output folders that appear whole or not at all: written in a hidden sibling, renamed at the
end, never on top of the input."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import InvalidArgumentError, OutputExistsError
from moekit.io.writer import DEFAULT_SHARD_BYTES

if TYPE_CHECKING:
    from moekit.io.reader import Checkpoint
    from moekit.io.writer import OutTensor

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


def write_model_folder(checkpoint: Checkpoint, out: Path, tensors: list[OutTensor],
                       config: dict[str, Any], *, overwrite: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       on_bytes: Callable[[int, int], None] | None = None,
                       finish: Callable[[Path], None] | None = None) -> None:
    """Write a surgery's output (staged: whole or nothing): `tensors` as Hub-named shards with
    the source shards' metadata, `config`, the source's tokenizer/aux files, then `finish(staging
    folder)` (provenance, model card, evaluation) before the rename. `on_bytes(written, total)`
    is called once with 0 and after every tensor."""
    from moekit.io.config import write_config
    from moekit.io.writer import write_checkpoint

    metadata: dict[str, str] = {}
    for shard in checkpoint.shards:
        metadata.update(shard.metadata)
    total = sum(t.nbytes for t in tensors)
    if on_bytes:
        on_bytes(0, total)
    with staged_output(Path(out), overwrite, inputs=(checkpoint.folder,)) as staging:
        write_checkpoint(staging, tensors, max_shard_bytes=max_shard_bytes, metadata=metadata,
                         on_tensor=(lambda t: on_bytes(t.nbytes, total)) if on_bytes else None)
        write_config(config, staging)
        copy_aux_files(checkpoint.folder, staging)
        if finish is not None:
            finish(staging)
