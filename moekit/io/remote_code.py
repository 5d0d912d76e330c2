"""The one remote-code policy: code shipped inside a checkpoint never runs unless the user
passed `--trust-remote-code`, and transformers is never allowed to ask on the terminal.

Call `check_remote_code(folder, trust)` before any transformers load of that folder, and pass
`trust_remote_code=trust` to every transformers `from_pretrained` / `AutoConfig` /
`AutoTokenizer` call (with an explicit `False`, transformers refuses instead of prompting).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.errors import UnsafeCheckpointError, UnsupportedModelError

FLAG = "--trust-remote-code"


def check_remote_code(source: Path | str | dict[str, Any], trust: bool) -> None:
    """Refuse (UnsafeCheckpointError) when loading `source` would need code from the
    checkpoint: its config.json (or tokenizer_config.json) has an `auto_map` whose classes
    transformers does not have built in. `source` is a folder or a parsed config.json.
    A `model_type` that transformers does not know and no `auto_map` can supply is refused
    too (UnsupportedModelError), with or without `trust`.

    A Hub id that is not a local folder is not read here; the explicit
    `trust_remote_code=False` on the transformers call still refuses it without a prompt."""
    if isinstance(source, dict):
        _check_config(source, "config.json", "the checkpoint", trust)
        return
    folder = Path(source)
    if not folder.is_dir():
        return
    _check_config(_read_json(folder / "config.json"), "config.json", str(folder), trust)
    if not trust:
        _check_tokenizer(_read_json(folder / "tokenizer_config.json"), str(folder))


def _check_config(config: dict[str, Any], file: str, where: str, trust: bool) -> None:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or _known_model_type(model_type):
        return  # a known type: transformers uses its own class and ignores any auto_map
    auto_map = config.get("auto_map")
    if not auto_map:
        import transformers

        raise UnsupportedModelError(
            f"{where}: transformers {transformers.__version__} does not know model_type "
            f"'{model_type}' ({file} has no auto_map code for it either)",
            "upgrade transformers (pip install -U transformers), or correct model_type in "
            f"{file} if it is wrong")
    if not trust:
        _refuse(where, file, auto_map, f"transformers has no built-in model_type '{model_type}'")


def _check_tokenizer(config: dict[str, Any], where: str) -> None:
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    name = config.get("tokenizer_class")
    if isinstance(name, str) and _known_tokenizer_class(name):
        return
    _refuse(where, "tokenizer_config.json", auto_map,
            f"transformers has no built-in tokenizer class '{name}'")


def _refuse(where: str, file: str, auto_map: Any, reason: str) -> None:
    code = ", ".join(code_files(auto_map)) or "code named in auto_map"
    raise UnsafeCheckpointError(
        f"{where} needs its own Python code to load ({file} auto_map -> {code}; {reason}); "
        "moekit does not run code from a checkpoint",
        f"read {code} and pass {FLAG} only if you trust it")


def code_files(auto_map: Any) -> list[str]:
    """The .py files an `auto_map` points at: `mod.Class` -> `mod.py`, `repo--mod.Class` ->
    `repo:mod.py`; values may be strings or [slow, fast] lists."""
    values: list[Any] = list(auto_map.values()) if isinstance(auto_map, dict) else [auto_map]
    names: list[str] = []
    for value in values:
        for ref in value if isinstance(value, list) else [value]:
            if not isinstance(ref, str) or "." not in ref:
                continue
            repo, _, module = ref.rpartition("--")
            file = module.rsplit(".", 1)[0].replace(".", "/") + ".py"
            name = f"{repo}:{file}" if repo else file
            if name not in names:
                names.append(name)
    return names


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _known_tokenizer_class(name: str) -> bool:
    import transformers

    try:
        return getattr(transformers, name, None) is not None
    except Exception:  # noqa: BLE001 - a lazy import that fails means "not available"
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
