"""Calibration and evaluation text: plain text, JSONL, JSON, Parquet or folders of those,
optionally named (`code=src.txt`), tokenised with the model's tokenizer and packed into
fixed-length windows. Windows are never padded, so padding never counts."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.documents import SUPPORTED, documents, source_files
from moekit.errors import DataError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"


@dataclass(frozen=True)
class DataSource:
    """One `--data` value: a domain name and the file or folder it reads."""

    name: str
    path: Path

    @staticmethod
    def parse(value: str) -> DataSource:
        """`name=path` or `path` (the name is then the file or folder stem)."""
        name, sep, path = value.partition("=")
        named = bool(sep and name and not Path(value).exists())
        text = path if named else value
        if not text.strip():  # Path("") is the current folder: never read it unasked
            raise DataError(f"--data '{value}': the path is empty",
                            "pass NAME=PATH of a file or folder")
        return DataSource(name.strip() if named else Path(text).stem, Path(text).expanduser())


@dataclass
class Domain:
    """Token windows of one data source. `windows[i]` is a 1-D int64 tensor of <= seq_len."""

    name: str
    sha256: str
    files: list[str]
    windows: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(int(w.numel()) for w in self.windows)


def check_text(source: DataSource, piece: str, seen: list[int], final: bool = False) -> None:
    """Count `piece`'s control characters and U+FFFD (invalid UTF-8) into `seen` = [checked,
    not text] while fewer than NOT_TEXT_SAMPLE were checked; refuse the source once the sample
    is full (or at its end, `final`) when more than NOT_TEXT_SHARE of it is not text."""
    if seen[0] < NOT_TEXT_SAMPLE and piece:
        piece = piece[:NOT_TEXT_SAMPLE - seen[0]]
        seen[0] += len(piece)
        seen[1] += len(NOT_TEXT.findall(piece))
    if (final or seen[0] >= NOT_TEXT_SAMPLE) and seen[0] and seen[1] > NOT_TEXT_SHARE * seen[0]:
        raise DataError(f"data source {source.path} does not look like text: "
                        f"{seen[1] / seen[0]:.0%} of its first {seen[0]:,} characters are control "
                        "characters or invalid UTF-8",
                        "give UTF-8 text (convert another encoding first, e.g. iconv -t utf-8)")


def default_sources() -> list[DataSource]:
    """The texts shipped in sample_data/, one domain each."""
    files = sorted(p for p in SAMPLE_DATA.glob("*") if p.suffix in SUPPORTED and
                   p.name.lower() != "readme.md")
    if not files:
        raise DataError("no --data given and sample_data/ has no texts",
                        "pass --data FILE (text, JSONL, Parquet or a folder)")
    return [DataSource(p.stem, p) for p in files]


def parse_fraction(value: str | None) -> tuple[float, float]:
    """`START:END` as fractions of each source (e.g. `0:0.5` = first half)."""
    if not value:
        return 0.0, 1.0
    try:
        start, end = (float(x) if x else d for x, d in zip(value.split(":"), (0.0, 1.0),
                                                          strict=True))
    except ValueError as err:
        raise InvalidArgumentError(f"--data-range '{value}' is not START:END",
                                   "use fractions such as 0:0.5 or 0.5:1") from err
    if not 0.0 <= start < end <= 1.0:
        raise InvalidArgumentError(f"--data-range '{value}' must satisfy 0 <= START < END <= 1")
    return start, end


def load_domains(sources: list[DataSource], tokenizer: Any, *, seq_len: int, max_tokens: int,
                 text_field: str = "text", fraction: tuple[float, float] = (0.0, 1.0)
                 ) -> list[Domain]:
    """Tokenise each source and pack it into windows of `seq_len` tokens, at most `max_tokens`
    tokens per source. Documents are joined with the EOS token."""
    if max_tokens <= 0:
        raise InvalidArgumentError(f"--max-tokens must be positive, got {max_tokens}")
    if seq_len <= 1:
        raise InvalidArgumentError(f"--seq-len must be at least 2, got {seq_len}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"data names repeat: {names}",
                                   "name them: --data a=X --data b=Y")
    return [_domain(s, tokenizer, seq_len, max_tokens, text_field, fraction) for s in sources]


NOT_TEXT = re.compile(r"[\x00-\x08\x0e-\x1f\ufffd]")  # control characters, invalid UTF-8
NOT_TEXT_SHARE = 0.3  # above this share of the first NOT_TEXT_SAMPLE characters: not text
NOT_TEXT_SAMPLE = 1 << 20


def _domain(source: DataSource, tokenizer: Any, seq_len: int, max_tokens: int, text_field: str,
            fraction: tuple[float, float]) -> Domain:
    """Read and tokenise piece by piece until `max_tokens`; the sha256 covers the text read.
    A source whose first characters are mostly control characters or invalid UTF-8 (binary
    data) is refused (`check_text`)."""
    import torch

    files = source_files(source.path)
    digest = hashlib.sha256()
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    read_any = False
    seen = [0, 0]  # characters checked, of which not text
    for document in documents(files, text_field, fraction):
        read_any = True
        for piece in document:
            check_text(source, piece, seen)
            digest.update(piece.encode())
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
            if len(ids) >= max_tokens:
                break
        if len(ids) >= max_tokens:
            break
        if eos is not None:
            ids.append(eos)
    if not read_any:
        raise DataError(f"data source {source.path} is empty", "give a file with some text in it")
    check_text(source, "", seen, final=True)
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"data source {source.path} gives fewer than 2 tokens")
    flat = torch.tensor(ids, dtype=torch.long)
    windows = [w for w in flat.split(seq_len) if w.numel() >= 2]
    return Domain(source.name, digest.hexdigest()[:16], [str(f) for f in files], windows)


def batches(domain: Domain, batch_size: int) -> Iterator[torch.Tensor]:
    """[B, S] batches of equal-length windows (the short last window comes alone)."""
    import torch

    full = [w for w in domain.windows if w.numel() == domain.windows[0].numel()]
    rest = domain.windows[len(full):]
    for start in range(0, len(full), batch_size):
        yield torch.stack(full[start:start + batch_size])
    for window in rest:
        yield window.unsqueeze(0)
