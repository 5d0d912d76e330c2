"""Provenance file and model card written into every output checkpoint."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moekit import __version__

PROVENANCE_NAME = "moekit_provenance.json"


def provenance(operation: str, source: str, **details: Any) -> dict[str, Any]:
    """The common provenance record: operation, source, command line, version, time, details."""
    return {
        "operation": operation,
        "source": source,
        "moekit_version": __version__,
        "command": shlex.join(["moekit", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **details,
    }


def write_provenance(folder: Path, record: dict[str, Any]) -> Path:
    path = Path(folder) / PROVENANCE_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def write_model_card(folder: Path, *, base_model: str, title: str, summary: str,
                     tags: list[str], body: str = "", source_card: Path | None = None) -> Path:
    """README.md with YAML front matter (`base_model`, `tags`, `library_name`). The source's own
    licence line is kept when its card has one."""
    license_line = _license_of(source_card)
    front = ["---", f"base_model: {json.dumps(base_model)}", "library_name: transformers"]
    if license_line:
        front.append(license_line)
    front.append("tags:")
    front += [f"- {tag}" for tag in ["moekit", *tags]]
    front.append("---")
    text = "\n".join(front) + f"\n\n# {title}\n\n{summary}\n\n{body}".rstrip() + "\n\n"
    text += (f"Made with [moekit](https://github.com/moekit/moekit) {__version__}; the exact "
             f"operation is recorded in `{PROVENANCE_NAME}`.\n")
    path = Path(folder) / "README.md"
    path.write_text(text)
    return path


def _license_of(card: Path | None) -> str | None:
    if card is None or not card.exists():
        return None
    lines = card.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line
    return None
