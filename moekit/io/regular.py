"""Refuse non-regular files before reading them: a FIFO blocks forever, `/dev/zero` or
`/dev/urandom` never ends, a socket cannot be read. Every file moekit (or transformers, for it)
reads from a model folder, a `--tokenizer` folder or a `--data` path is checked here first,
links followed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from moekit.errors import MoekitError

# Regular files that belong to a checkpoint beside its weights (tokenizer, generation, chat
# template, licence); copied into every output, never through a link that leaves the folder.
AUX_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
             "spiece.model", "sentencepiece.bpe.model", "tiktoken.model", "qwen.tiktoken",
             "generation_config.json", "chat_template.json", "chat_template.jinja",
             "preprocessor_config.json", "processor_config.json", "LICENSE", "LICENSE.txt",
             "LICENSE.md", "NOTICE", "NOTICE.txt", "USE_POLICY.md")
MODEL_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".tiktoken")
INPUT_SUFFIXES = (".json", ".csv", ".parquet", ".npz", ".safetensors", ".txt", ".jsonl")
KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISDIR, "a folder"))


def check_regular(path: Path, what: str, error: type[MoekitError]) -> None:
    """Raise `error` when `path` exists but is not a regular file once links are followed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # missing files are the caller's own message
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
        raise error(f"{what} {path} is {kind}, not a regular file: moekit would block or read "
                    "without end", "replace it with a regular file (copy the data into a file)")


def check_model_folder(folder: Path, error: type[MoekitError]) -> None:
    """Every config, weight, index, tokenizer and template file directly in `folder`."""
    for path in sorted(Path(folder).iterdir()):
        if path.name in AUX_NAMES or path.suffix.lower() in MODEL_SUFFIXES:
            check_regular(path, "model file", error)


def check_inputs(paths: tuple[Path, ...], error: type[MoekitError]) -> None:
    """Each input given as a file (plan, keep/drop list, data file), and the table, JSON and
    weight files directly inside each input folder (a stats folder, a data folder)."""
    for path in paths:
        if Path(path).is_dir():
            for child in sorted(Path(path).iterdir()):
                if child.suffix.lower() in INPUT_SUFFIXES:
                    check_regular(child, "input file", error)
        else:
            check_regular(path, "input file", error)
