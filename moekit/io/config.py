"""Read and patch config.json, keeping the key names, order and value types the source used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def sub_config(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The nested dict at `path` (the text sub-config of a multimodal model)."""
    for key in path:
        config = config[key]
    return config


def set_existing(config: dict[str, Any], keys: tuple[str, ...], value: Any) -> list[str]:
    """Set every alias in `keys` that `config` already has to `value` (cast to the type the
    source used). Returns the keys changed."""
    changed = []
    for key in keys:
        if key in config and config[key] is not None:
            old = config[key]
            config[key] = type(old)(value) if isinstance(old, (int, float)) else value
            changed.append(key)
    return changed


def write_config(config: dict[str, Any], folder: Path) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
