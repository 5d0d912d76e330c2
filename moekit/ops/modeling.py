"""Module-level access: load a transformers model and its tokenizer for profile and eval."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from moekit.errors import DataError, InvalidArgumentError, transformers_load_errors

DTYPES = ("auto", "float32", "bfloat16", "float16")


def quiet_transformers() -> None:
    """No progress bars, no load reports, no Hub kernels, no warnings that are no news to a
    moekit user (long texts are cut into windows by moekit; zero-width experts are valid)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pick_device(device: str) -> Any:
    """`auto` -> cuda when available, else cpu."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but torch sees no CUDA device",
                                   "use --device cpu or auto")
    return torch.device(device)


def load_model(path: Path, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False) -> Any:
    """An eval-mode AutoModelForCausalLM on `device`; `auto` dtype keeps the checkpoint's.
    Code shipped in the checkpoint runs only with `trust_remote_code` (moekit.io.remote_code)."""
    import torch

    from moekit.io.remote_code import check_remote_code

    if dtype not in DTYPES:
        raise InvalidArgumentError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    check_remote_code(path, trust_remote_code)
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    with transformers_load_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    return model.to(pick_device(device)).eval()


def load_tokenizer(model_path: Path, tokenizer: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, or `tokenizer` (folder or Hub id) when given."""
    from moekit.io.remote_code import check_remote_code

    check_remote_code(tokenizer or model_path, trust_remote_code)
    quiet_transformers()
    from transformers import AutoTokenizer

    source = tokenizer or str(model_path)
    has_files = tokenizer is not None or any(
        (Path(model_path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                                  "tokenizer.model", "vocab.json"))
    if not has_files:
        raise DataError(f"{model_path} has no tokenizer files",
                        "pass --tokenizer FOLDER_OR_REPO with the model's tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load a tokenizer from {source}: {err}".splitlines()[0],
                        "pass --tokenizer FOLDER_OR_REPO") from err
