"""compressed-tensors checkpoints (quant_method "compressed-tensors"; llm-compressor's outputs:
W4A16/W8A16 `pack-quantized`, NVFP4 `nvfp4-pack-quantized`, FP8/INT8 `float-quantized` /
`int-quantized` / `naive-quantized`).

Stored, per quantized module X (a Linear or one expert's projection): the compressed
parameters the format's compressor names (`compressed_tensors.compressors`), e.g.
`X.weight_packed` int32 [out, ceil(in * bits / 32)], `X.weight_scale` [out, in / group],
`X.weight_shape` [2] and, asymmetric, `X.weight_zero_point`; NVFP4 `X.weight_packed` uint8
[out, in / 2], `X.weight_scale` F8_E4M3 [out, in / 16], `X.weight_global_scale` [1];
float/int-quantized `X.weight` with `X.weight_scale`. Activation parameters (`input_scale`,
`input_global_scale`, ...) are not part of the weight and are dropped when decoding.

Decoding is the library's own (`Compressor.decompress`), the format's reference: the library is
imported only when such a checkpoint is read (`pip install compressed-tensors`). Each module's
scheme is the config group whose `targets` match it: a `re:` pattern matching X first, else the
group that targets layer classes (e.g. `Linear`); `ignore`d modules are stored plain.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError, UnsupportedModelError
from moekit.formats.spec import Logical
from moekit.io.header import TensorInfo

if TYPE_CHECKING:
    import torch

NAME = "compressed-tensors"
MARKERS = ("weight_packed", "weight_scale")
ACTIVATION = ("input_scale", "input_global_scale", "input_zero_point", "output_scale",
              "output_zero_point")


def group(tensors: dict[str, TensorInfo], quantization: dict) -> dict[str, Logical]:
    """Logical weights of the compressed modules in `tensors`, keyed by every stored key used."""
    config = _config(quantization)
    out: dict[str, Logical] = {}
    for key in tensors:
        base, _, name = key.rpartition(".")
        if name not in MARKERS or f"{base}.weight" in out:
            continue
        scheme, fmt = _scheme(config, base)
        compressor = _compressor(fmt)
        params = [p for p in compressor.compression_param_names(scheme) if f"{base}.{p}" in tensors]
        if "weight_packed" not in params and "weight" not in params:
            params.insert(0, "weight")
        missing = [p for p in params if f"{base}.{p}" not in tensors]
        if missing:
            raise CheckpointError(f"compressed module '{base}' lacks {missing}",
                                  "the checkpoint is incomplete: re-download it")
        sources = tuple(tensors[f"{base}.{p}"] for p in params)
        logical = Logical(f"{base}.weight", _shape(fmt, scheme, tensors, base), f"{NAME}/{fmt}",
                          sources, (), tuple(params), scheme)
        for info in sources:
            out[info.name] = logical
        for extra in ACTIVATION:
            if f"{base}.{extra}" in tensors:
                out[f"{base}.{extra}"] = logical
        out[f"{base}.weight"] = logical
    return out


def decode(logical: Logical, *stored: torch.Tensor) -> torch.Tensor:
    """float32 weight [out, in] of one compressed module (the library's decompression)."""
    import torch

    fmt = logical.format.split("/", 1)[1]
    state = dict(zip(logical.params, stored, strict=True))
    weight = _compressor(fmt).decompress(state, logical.scheme)["weight"]
    return weight.to(torch.float32)


def _config(quantization: dict) -> Any:
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as err:
        raise UnsupportedModelError(
            "this checkpoint is stored with compressed-tensors, which is not installed",
            "pip install compressed-tensors") from err
    try:
        return QuantizationConfig.model_validate(quantization)
    except ValueError as err:
        raise CheckpointError(f"config.json's compressed-tensors quantization_config is not "
                              f"valid: {str(err).splitlines()[0]}",
                              "fix or re-download config.json") from err


def _scheme(config: Any, base: str) -> tuple[Any, str]:
    """(QuantizationScheme, storage format) of module `base`."""
    plain = None
    for scheme in config.config_groups.values():
        targets = list(getattr(scheme, "targets", []) or [])
        if any(t.startswith("re:") and re.match(t[3:], base) for t in targets):
            return scheme, _format(config, scheme)
        if plain is None and any(not t.startswith("re:") for t in targets):
            plain = scheme
    if plain is None:
        raise CheckpointError(f"no config group of quantization_config targets '{base}'",
                              "the config and the weights disagree")
    return plain, _format(config, plain)


def _format(config: Any, scheme: Any) -> str:
    fmt = getattr(scheme, "format", None) or config.format
    return str(getattr(fmt, "value", fmt))


def _compressor(fmt: str) -> Any:
    from compressed_tensors.compressors import BaseCompressor

    try:
        return BaseCompressor.get_value_from_registry(fmt)
    except (KeyError, ValueError) as err:
        raise UnsupportedModelError(f"compressed-tensors format '{fmt}' is not supported",
                                    "dequantize the checkpoint with llm-compressor first") from err


def _shape(fmt: str, scheme: Any, tensors: dict[str, TensorInfo], base: str) -> tuple[int, ...]:
    """Logical [out, in] from the headers: packed widths, or the scale grid for groups."""
    if f"{base}.weight" in tensors:
        return tuple(tensors[f"{base}.weight"].shape)
    packed = tensors[f"{base}.weight_packed"].shape
    if fmt.startswith(("nvfp4", "mxfp4")):
        return (*packed[:-1], packed[-1] * 2)
    weights = scheme.weights
    if weights.group_size and f"{base}.weight_scale" in tensors:
        return (*packed[:-1], tensors[f"{base}.weight_scale"].shape[-1] * weights.group_size)
    return (*packed[:-1], packed[-1] * 32 // weights.num_bits)
