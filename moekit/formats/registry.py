"""Which stored format each checkpoint tensor is in, keyed by `quantization_config.quant_method`
and the stored tensors' names and dtypes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError, UnsupportedModelError
from moekit.formats import compressed, fp8_block, mxfp4
from moekit.formats.spec import PLAIN, Logical

if TYPE_CHECKING:
    import torch

    from moekit.io.reader import Checkpoint

FORMATS = {"fp8": fp8_block, "mxfp4": mxfp4, "compressed-tensors": compressed}
DECODERS = {fp8_block.NAME: fp8_block.decode, mxfp4.NAME: mxfp4.decode}


def check_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config`, or None; refuses one moekit cannot read."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or not isinstance(quantization.get("quant_method"), str):
        raise CheckpointError("config.json's quantization_config has no quant_method",
                              "fix or re-download config.json")
    method = quantization["quant_method"]
    if method not in FORMATS:
        raise UnsupportedModelError(
            f"quantization_config.quant_method '{method}' is not supported "
            f"(moekit reads {', '.join(sorted(FORMATS))})",
            "use an unquantized (bf16) release of the model")
    return quantization


def is_quantized(checkpoint: Checkpoint) -> bool:
    """Whether any tensor of `checkpoint` is stored in a quantized format."""
    return any(logical.quantized for logical in logical_tensors(checkpoint).values())


def quantized_keys(checkpoint: Checkpoint, keys: list[str]) -> str:
    """The quantized formats among stored `keys` ("fp8-block", ...), or "" when all are plain."""
    formats = {}
    for logical in logical_tensors(checkpoint).values():
        if logical.quantized:
            formats.update((source.name, logical.format) for source in logical.sources)
    return ", ".join(sorted({formats[k] for k in keys if k in formats}))


def quantized_parts(checkpoint: Checkpoint, keys: Iterable[str]) -> dict[str, Logical]:
    """{stored key: its quantized logical tensor} among `keys` (headers only; a logical
    tensor's stored tensors must all be among `keys`, as one MoE layer's routed keys are)."""
    quantization = check_quantization(checkpoint.config)
    if quantization is None:
        return {}
    subset = {k: checkpoint.tensors[k] for k in keys}
    return FORMATS[quantization["quant_method"]].group(subset, quantization)


def logical_tensors(checkpoint: Checkpoint) -> dict[str, Logical]:
    """Every logical tensor of `checkpoint` by logical name, in stored order (headers only)."""
    quantization = check_quantization(checkpoint.config)
    claimed: dict[str, Logical] = {}
    if quantization is not None:
        claimed = FORMATS[quantization["quant_method"]].group(checkpoint.tensors, quantization)
    out: dict[str, Logical] = {}
    for key, info in checkpoint.tensors.items():
        logical = claimed.get(key)
        if logical is None:
            out[key] = Logical(key, tuple(info.shape), PLAIN, (info,))
        elif logical.name not in out:
            out[logical.name] = logical
    return out


def quantized_formats(logical: dict[str, Logical]) -> dict[str, int]:
    """{format: logical parameters stored in it} of `logical_tensors(...)`, plain dtypes by
    their safetensors name (compressed-tensors modules as `compressed-tensors/FORMAT`)."""
    counts: dict[str, int] = {}
    for tensor in logical.values():
        name = tensor.format if tensor.quantized else tensor.sources[0].dtype
        counts[name] = counts.get(name, 0) + tensor.numel
    return counts


def decode(logical: Logical, stored: list[torch.Tensor]) -> torch.Tensor:
    """The float32 values of `logical` from its stored tensors (in `logical.sources` order)."""
    if not logical.quantized:
        return stored[0]
    if logical.format.startswith(compressed.NAME):
        return compressed.decode(logical, *stored)
    return DECODERS[logical.format](logical, *stored[:2])
