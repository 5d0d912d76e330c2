"""Load a transformers model (whole, or as a `meta` skeleton for streaming) and its tokenizer.

Code shipped inside a checkpoint (`auto_map`) runs only when the user passed
`--trust-remote-code`: every entry point calls `moekit.io.remote_code.check_remote_code` first
and every transformers call passes `trust_remote_code` explicitly, so transformers never prompts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from moekit.errors import DataError, InvalidArgumentError, MoekitError, transformers_load_errors
from moekit.io.dtypes import to_torch
from moekit.io.regular import check_model_folder
from moekit.io.remote_code import check_remote_code

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
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise InvalidArgumentError(f"--device {device!r} is not a device torch knows",
                                   "use auto, cpu or cuda:N") from err


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")


def load_model(path: Path, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False) -> Any:
    """An eval-mode AutoModelForCausalLM on `device`; `auto` dtype as `load_dtype`."""
    import torch

    check_dtype(dtype)
    check_remote_code(path, trust_remote_code)
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    target = pick_device(device)
    torch_dtype = torch.float32 if dtype == "auto" and target.type == "cpu" else (
        "auto" if dtype == "auto" else getattr(torch, dtype))
    with transformers_load_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    return runnable_experts(model.to(target).eval())


def runnable_experts(model: Any) -> Any:
    """`model`, switched to transformers' `eager` experts loop when its default `grouped_mm`
    kernel cannot run the expert matrices: that kernel needs every row of every stacked expert
    matrix [E, rows, cols] (both strides) to be a multiple of 16 bytes, e.g. an intermediate
    width of 36 fails in bfloat16 and 30 in every dtype ("strides should be multiple of 16")."""
    def aligned(param: Any) -> bool:
        return param.ndim != 3 or all(n * param.element_size() % 16 == 0
                                      for n in param.shape[1:])

    unaligned = any(not aligned(p) for name, p in model.named_parameters()
                    if ".experts." in name)
    if unaligned and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def load_dtype(config: Any, dtype: str, checkpoint: Any, device: Any = None) -> Any:
    """The torch dtype a run holds the weights in: `dtype`, or for `auto` float32 on a CPU
    (`device` None or of type cpu: exact, and several times faster than bfloat16 on CPUs without
    native bf16 matrix units; a model too large for the memory budget is streamed) and the
    checkpoint's own dtype on an accelerator (`stored_dtype`)."""
    import torch

    check_dtype(dtype)
    if dtype != "auto":
        return getattr(torch, dtype)
    if device is None or getattr(device, "type", device) == "cpu":
        return torch.float32
    return stored_dtype(config, checkpoint)


def held_itemsize(checkpoint: Any, dtype: str | None, device: Any) -> int:
    """Bytes per weight element a run holds (`load_dtype`'s rule, from the headers alone):
    4 for float32 and for `auto` on a CPU, else 2 (16-bit), or the checkpoint's first floating
    tensor's size for `auto` on an accelerator."""
    if dtype not in ("auto", None):
        return 4 if dtype == "float32" else 2
    if pick_device(device if isinstance(device, str) else str(device)).type == "cpu":
        return 4
    return 4 if _first_floating(checkpoint) == "F32" else 2


def _first_floating(checkpoint: Any) -> str:
    """The safetensors dtype of the checkpoint's first floating tensor (F32 when none)."""
    return next((t.dtype for t in checkpoint.tensors.values()
                 if t.dtype in ("F32", "F16", "BF16")), "F32")


def stored_dtype(config: Any, checkpoint: Any) -> Any:
    """The checkpoint's dtype: the config's `dtype` (else the first floating tensor's on disk),
    as `from_pretrained(dtype="auto")` takes it."""
    import torch

    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype):
        return declared
    return to_torch(_first_floating(checkpoint))


def build_skeleton(path: Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """`AutoModelForCausalLM.from_config` under `torch.device("meta")`: every module built, no
    weight allocated. Parameters get `dtype` (not the class default float32)."""
    import torch

    check_remote_code(path, trust_remote_code)
    quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return runnable_experts(model.eval())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_path: Path, tokenizer: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, or `tokenizer` (folder or Hub id) when given."""
    if tokenizer is not None and Path(tokenizer).is_dir():
        check_model_folder(Path(tokenizer), DataError)
    check_remote_code(tokenizer or model_path, trust_remote_code)
    quiet_transformers()
    from transformers import AutoTokenizer

    source = tokenizer or str(model_path)
    has_files = tokenizer is not None or any(
        (Path(model_path) / n).exists() for n in TOKENIZER_FILES)
    if not has_files:
        raise DataError(f"{model_path} has no tokenizer files",
                        "pass --tokenizer FOLDER_OR_REPO with the model's tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except MoekitError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers raise KeyError, Exception, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load the tokenizer from {_tokenizer_files(source)}: "
                        f"{type(err).__name__}: {first}",
                        "fix or re-download those files, or pass --tokenizer FOLDER_OR_REPO"
                        ) from err


def _tokenizer_files(source: str) -> str:
    """The tokenizer files of a local folder, named (else the folder or repo id itself)."""
    folder = Path(source)
    found = [str(folder / n) for n in TOKENIZER_FILES if (folder / n).is_file()]
    return ", ".join(found) if folder.is_dir() and found else source
