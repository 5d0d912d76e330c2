"""Documents of a data source, read lazily: text files in pieces of at most READ_BYTES, JSONL
line by line, Parquet batch by batch, so that a token budget stops the reading early.

A document is an iterator of text pieces (a large text file is one document of many pieces,
cut before a newline or space so no word is split; text without whitespace at READ_BYTES
characters). Blank documents are skipped. With a
`fraction` (START, END): a source of one document keeps that part of its characters (bytes
for a text file); a source of N documents keeps documents [int(START N), int(END N)).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

from moekit.errors import DataError
from moekit.io.regular import check_regular

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SUPPORTED = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
READ_BYTES = 1 << 16
Document = Iterator[str]


def source_files(path: Path) -> list[Path]:
    """The files of a `--data` path (a folder: every supported file in it, sorted)."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "check the --data path")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
                   ) if path.is_dir() else [path]
    if not path.is_dir():
        check_regular(path, "data file", DataError)
    if not files:
        raise DataError(f"folder {path} holds no {', '.join(SUPPORTED)} files")
    for file in files:
        if file.suffix.lower() not in SUPPORTED:
            raise DataError(f"cannot read {file.name}: unsupported file type "
                            f"'{file.suffix.lower()}'", f"use one of {', '.join(SUPPORTED)}")
    return files


def documents(files: list[Path], text_field: str,
              fraction: tuple[float, float] = (0.0, 1.0)) -> Iterator[Document]:
    """The non-blank documents of `files`, restricted to `fraction`."""
    if fraction == (0.0, 1.0):
        yield from _all_documents(files, text_field)
        return
    count = sum(1 for doc in _all_documents(files, text_field) if _drain(doc))
    start, end = fraction
    if count == 1:
        yield _slice_one(files, text_field, start, end)
        return
    yield from islice(_all_documents(files, text_field), int(start * count), int(end * count))


def _drain(doc: Document) -> bool:
    for _ in doc:
        pass
    return True


def _all_documents(files: list[Path], text_field: str) -> Iterator[Document]:
    for file in files:
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            doc = _nonblank(text_pieces(file))
            if doc is not None:
                yield doc
            continue
        records = {".jsonl": _jsonl_texts, ".json": _json_texts, ".parquet": _parquet_texts}
        for text in records[suffix](file, text_field):
            if text.strip():
                yield iter([text])


def _nonblank(pieces: Iterator[str]) -> Document | None:
    """`pieces` again, or None when all of it is whitespace (read up to the first text)."""
    held: list[str] = []
    for piece in pieces:
        held.append(piece)
        if piece.strip():
            return chain(held, pieces)
    return None


def _slice_one(files: list[Path], text_field: str, start: float, end: float) -> Document:
    """The START:END part of the only document (bytes of a text file, else characters)."""
    file = next(f for f in files if any(True for _ in _all_documents([f], text_field)))
    if file.suffix.lower() in TEXT_SUFFIXES:
        size = file.stat().st_size
        return text_pieces(file, int(start * size), int(end * size))
    text = next("".join(d) for d in _all_documents([file], text_field))
    return iter([text[int(start * len(text)):int(end * len(text))]])


def text_pieces(path: Path, begin: int = 0, stop: int | None = None) -> Iterator[str]:
    """Bytes [begin, stop) of a UTF-8 text file as text pieces of about READ_BYTES, each cut
    before its last newline or space so that words stay whole (text without whitespace is cut
    at READ_BYTES characters). Bad bytes become U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with open(path, "rb") as handle:
        handle.seek(begin)
        left = None if stop is None else max(stop - begin, 0)
        first = begin > 0
        while left is None or left > 0:
            raw = handle.read(READ_BYTES if left is None else min(READ_BYTES, left))
            if not raw:
                break
            if left is not None:
                left -= len(raw)
            text = carry + decoder.decode(raw)
            if first:  # started inside a character: drop its continuation bytes
                text, first = text.lstrip("\ufffd"), False
            piece, carry = _cut(text)
            if piece:
                yield piece
    rest = carry + decoder.decode(b"", final=True)
    if rest:
        yield rest


def _cut(text: str) -> tuple[str, str]:
    """(piece, carry): `text` cut before its last newline or space (the next piece starts
    " word"); text without either (one-line CJK) is cut at READ_BYTES characters, so that a
    token budget bounds the reading of it too."""
    cut = max(text.rfind("\n"), text.rfind(" "))
    if cut > 0:
        return text[:cut], text[cut:]
    return (text, "") if len(text) >= READ_BYTES else ("", text)


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                reason = f"{err.msg} at column {err.colno}" if isinstance(
                    err, json.JSONDecodeError) else "nested too deeply"
                raise DataError(f"{path.name} line {number} is not valid JSON ({reason})",
                                "fix or remove that line") from err
            yield text_of(record, text_field, path, f"line {number}")


def _json_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        records = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError) as err:
        where = f" ({err.msg} at line {err.lineno})" if isinstance(
            err, json.JSONDecodeError) else ""
        raise DataError(f"{path.name} is not valid JSON{where}",
                        "give a JSON list of records, or JSONL (one record per line)") from err
    records = records if isinstance(records, list) else [records]
    for number, record in enumerate(records, 1):
        yield text_of(record, text_field, path, f"record {number}")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DataError(f"{path.name} is not a readable Parquet file",
                        "re-export it, or give text/JSONL") from err
    names = table.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path.name} has no column '{text_field}' (columns: "
                        f"{', '.join(map(str, names))})", "pass --text-field NAME")
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:  # empty cells are skipped, as pandas' dropna did
                continue
            if not isinstance(value, str):
                raise DataError(f"{path.name} row {row}: column '{text_field}' holds "
                                f"{type(value).__name__} values, not text",
                                "pass --text-field NAME of a text column")
            yield value


def text_of(record: Any, text_field: str, path: Path, where: str) -> str:
    """The text of one record: a string, or the string under `text_field` of an object."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path.name} {where} has no field '{text_field}' (has: {keys})",
                        "pass --text-field NAME")
    value = record[text_field]
    if not isinstance(value, str):
        name = type(value).__name__
        kind = "null" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
        raise DataError(f"{path.name} {where}: field '{text_field}' is {kind}, not text",
                        "remove that record or pass --text-field NAME")
    return value
