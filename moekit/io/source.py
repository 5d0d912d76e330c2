"""Turn what the user typed (a folder or a Hub repo id) into a local checkpoint folder."""

from __future__ import annotations

import re
from pathlib import Path

from moekit.errors import ModelSourceError
from moekit.io.regular import check_model_folder

HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                "generation_config.json", "chat_template*", "*.tiktoken", "*.model"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_source(model: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a Hub repo id (`org/name`) fetched with only the files moekit needs.

    With `HF_HUB_OFFLINE=1` the repo is taken from the local Hub cache (`HF_HUB_CACHE`).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{model} is a file, not a checkpoint folder",
                                   "pass the folder that holds config.json")
        check_model_folder(path, ModelSourceError)
        return path
    text = str(model)
    if not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"model folder {model} does not exist",
                               "pass a checkpoint folder or a Hub repo id such as org/name")
    folder = _download(text, revision)
    check_model_folder(folder, ModelSourceError)
    return folder


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id} (revision {revision})" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise ModelSourceError(
            f"{where} is neither a local folder nor in the Hub cache, and the Hub cannot be "
            "reached", "check the path and --revision, or connect and unset HF_HUB_OFFLINE"
        ) from err
    except HfHubHTTPError as err:
        raise ModelSourceError(f"cannot fetch {repo_id} from the Hub: {err}",
                               "check the repo id, --revision, and HF_TOKEN for gated repos"
                               ) from err
