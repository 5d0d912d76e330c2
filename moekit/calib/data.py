"""Calibration and evaluation text: plain text, JSONL, JSON, Parquet or folders of those,
optionally named (`code=src.txt`), tokenised with the model's tokenizer and packed into
fixed-length windows. Windows are never padded, so padding never counts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import DataError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SUPPORTED = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
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
        if sep and name and not Path(value).exists():
            return DataSource(name.strip(), Path(path).expanduser())
        return DataSource(Path(value).stem, Path(value).expanduser())


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


def read_documents(source: DataSource, text_field: str = "text",
                   fraction: tuple[float, float] = (0.0, 1.0)) -> tuple[list[str], list[Path]]:
    """The documents of a source (a folder reads every supported file in it, sorted)."""
    path = source.path
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "check the --data path")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
                   ) if path.is_dir() else [path]
    if not files:
        raise DataError(f"folder {path} holds no {', '.join(SUPPORTED)} files")
    documents: list[str] = []
    for file in files:
        documents += _read_file(file, text_field)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"data source {path} is empty", "give a file with some text in it")
    return _slice(documents, fraction), files


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"cannot read {path.name}: unsupported file type '{suffix}'",
                        f"use one of {', '.join(SUPPORTED)}")
    if suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if text_field not in frame.columns:
            raise DataError(f"{path.name} has no column '{text_field}' (columns: "
                            f"{', '.join(map(str, frame.columns))})", "pass --text-field NAME")
        return [str(x) for x in frame[text_field].dropna()]
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".jsonl":
        return [_field(json.loads(line), text_field, path, n)
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if suffix == ".json":
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
        return [_field(r, text_field, path, n) for n, r in enumerate(records, 1)]
    return [text]


def _field(record: Any, text_field: str, path: Path, line: int) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path.name} record {line} has no field '{text_field}' (has: {keys})",
                        "pass --text-field NAME")
    return str(record[text_field])


def _slice(documents: list[str], fraction: tuple[float, float]) -> list[str]:
    start, end = fraction
    if (start, end) == (0.0, 1.0):
        return documents
    if len(documents) == 1:
        text = documents[0]
        return [text[int(start * len(text)):int(end * len(text))]]
    return documents[int(start * len(documents)):int(end * len(documents))]


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


def _domain(source: DataSource, tokenizer: Any, seq_len: int, max_tokens: int, text_field: str,
            fraction: tuple[float, float]) -> Domain:
    import torch

    documents, files = read_documents(source, text_field, fraction)
    digest = hashlib.sha256()
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in documents:
        digest.update(doc.encode())
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
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
