"""Provenance file and model card written into every output checkpoint."""

from __future__ import annotations

import json
import re
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
        "command": command_line(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **details,
    }


def command_line() -> str | None:
    """The `moekit ...` command line of this process, or None when the library was called
    from other Python code (its argv says nothing about the operation)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if Path(sys.argv[0]).name != "moekit" and getattr(spec, "name", "") != "moekit.__main__":
        return None
    return shlex.join(["moekit", *sys.argv[1:]])


def write_provenance(folder: Path, record: dict[str, Any]) -> Path:
    path = Path(folder) / PROVENANCE_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def write_model_card(folder: Path, *, base_model: str, title: str, summary: str,
                     tags: list[str], body: str = "", source_card: Path | None = None) -> Path:
    """README.md with YAML front matter (`base_model` when the source is a Hub id, `tags`,
    `library_name`). The source's own licence line is kept when its card has one."""
    license_line = _license_of(source_card)
    hub_id = base_model if _is_hub_id(base_model) else None
    front = ["---"] + ([f"base_model: {json.dumps(hub_id)}"] if hub_id else [])
    front.append("library_name: transformers")
    if license_line:
        front.append(license_line)
    front.append("tags:")
    front += [f"- {tag}" for tag in ["moekit", *tags]]
    front.append("---")
    if hub_id is None:  # the Hub's base_model must be a repo id: name the local folder instead
        summary += f"\n\nSource: the local checkpoint `{base_model}`."
    text = "\n".join(front) + f"\n\n# {title}\n\n{summary}\n\n{body}".rstrip() + "\n\n"
    text += (f"Made with [moekit](https://github.com/moekit/moekit) {__version__}; the exact "
             f"operation is recorded in `{PROVENANCE_NAME}`.\n")
    path = Path(folder) / "README.md"
    path.write_text(text)
    return path


def eval_markdown(evaluation: dict[str, Any]) -> str:
    """A markdown table of an EvalResult dict (per domain and overall)."""
    has_ref = evaluation.get("ref") is not None
    head = "| data | tokens | loss (nats) | perplexity |" + (
        " source perplexity | KL(ref‖model) | top-1 agree |" if has_ref else "")
    lines = ["## Evaluation", "", head, "|---" * (7 if has_ref else 4) + "|"]
    for row in [*evaluation["domains"], evaluation["overall"]]:
        cells = [row["name"], f"{row['tokens']:,}", f"{row['loss']:.4f}", f"{row['ppl']:.3f}"]
        if has_ref:
            ref_ppl = row.get("ref_ppl")
            cells += ["-" if ref_ppl is None else f"{ref_ppl:.3f}",
                      f"{max(row['kl'], 0.0) + 0.0:.4f}", f"{row['top1']:.2%}"]
        lines.append("| " + " | ".join(cells) + " |")
    if has_ref:
        lines.append("")
        lines.append(f"Reference: the source `{evaluation['ref']}` (before the change), same "
                     "token windows.")
    return "\n".join(lines) + "\n"


def protected_markdown(protected: dict[int, list[int]], action: str, also: str = "") -> str:
    """A card section naming the experts never `action` (super experts by default; `also`:
    what else protects one, e.g. prune's `--protect`)."""
    rows = [f"- layer {layer}: expert {', '.join(map(str, ids))}"
            for layer, ids in sorted(protected.items()) if ids]
    if not rows:
        return ""
    return ("\n## Protected experts\n\nNever " + action + ": super experts (an outstanding "
            "max_norm, where a few activations carry the model; kept by default, "
            f"`--no-protect-super` turns this off){also}.\n\n"
            + "\n".join(rows) + "\n")


def _is_hub_id(name: str) -> bool:
    """`org/name` that is not an existing local path (Hub ids have exactly one slash)."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
            and not Path(name).exists())


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
