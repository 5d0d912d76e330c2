"""Calibration for `upcycle --router data` and `--split-order cluster`: the input of every
dense FFN (the post-attention-norm hidden states) on calibration text, captured in one pass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import moekit.calib.data
import moekit.runtime.engine
from moekit.calib.data import batches
from moekit.calib.spec import DataSpec, per_source
from moekit.errors import DataError
from moekit.io.remote_code import check_remote_code
from moekit.ops.upcycle.plan import UPCYCLE_TOKENS
from moekit.runtime.loading import load_tokenizer, quiet_transformers
from moekit.runtime.options import RunOptions

if TYPE_CHECKING:
    import torch




@dataclass
class FfnInputs:
    """`inputs[layer]` is [T, H] float32: what the dense FFN of `layer` saw on T tokens."""

    inputs: dict[int, torch.Tensor]
    tokens: int
    sources: list[dict[str, object]]


def capture_ffn_inputs(folder: Path, data: DataSpec, *, run: RunOptions = RunOptions(),
                       batch_size: int = 8, **engine: object) -> FfnInputs:
    """Run the dense model once over the calibration text `data` (`calib.spec.DataSpec`)
    through `moekit.runtime` as `run` says (in memory or streamed under `run.max_memory`) and
    record each layer's FFN input with a forward pre-hook on `model.layers[i].mlp`.

    `data.max_tokens` counts in total over the sources, an equal share from each (None:
    `plan.UPCYCLE_TOKENS`). `run.dtype` auto: float32 on a CPU, the checkpoint's on an
    accelerator (`runtime.loading.load_dtype`). Memory: the model (or its streaming budget)
    plus T x H x 4 bytes per layer. Code shipped in the checkpoint runs only with
    `run.trust_remote_code`; `data.tokenizer` replaces the model's.
    """
    import torch

    check_remote_code(folder, run.trust_remote_code)
    from moekit.runtime.layers import find_stack

    tok = _tokenizer(folder, data.tokenizer, run.trust_remote_code)
    sources = data.resolved_sources()
    domains = moekit.calib.data.load_domains(
        sources, tok, seq_len=data.seq_len,
        max_tokens=per_source(data.total(UPCYCLE_TOKENS), len(sources)), fraction=data.fraction,
        text_field=data.text_field)
    model = moekit.runtime.engine.open_model(folder, **run.engine(), **engine)  # type: ignore[arg-type]
    layers = find_stack(model.model).layers
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [layer.mlp.register_forward_pre_hook(_recorder(captured[i]))
               for i, layer in enumerate(layers)]
    try:
        for _ in model.run([b for d in domains for b in batches(d, batch_size)]):
            pass
    finally:
        for handle in handles:
            handle.remove()
    inputs = {i: torch.cat(parts) for i, parts in captured.items()}
    tokens = sum(d.num_tokens for d in domains)
    record = [{"name": d.name, "sha256": d.sha256, "files": d.files, "tokens": d.num_tokens}
              for d in domains]
    return FfnInputs(inputs, tokens, record)


def _tokenizer(folder: Path, tokenizer: str | None, trust_remote_code: bool) -> object:
    """`tokenizer` when given (`runtime.loading.load_tokenizer`), else the dense model's."""
    if tokenizer is not None:
        return load_tokenizer(folder, tokenizer, trust_remote_code)
    quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the dense model's tokenizer from {folder}: {err}",
                        "the checkpoint needs tokenizer files for --router data / cluster, "
                        "or pass --tokenizer") from err


def _recorder(store: list[torch.Tensor]):  # noqa: ANN202 - a torch hook
    def hook(module, args):  # noqa: ANN001, ANN202, ARG001
        hidden = args[0]
        store.append(hidden.reshape(-1, hidden.shape[-1]).float().cpu().clone())

    return hook

