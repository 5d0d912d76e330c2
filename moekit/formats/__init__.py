"""Stored formats of checkpoint tensors: plain dtypes and quantized ones.

A quantized checkpoint stores one *logical* tensor (what an unquantized checkpoint would hold
under the same name, e.g. `...experts.3.w1.weight` [I, H] or gpt-oss `...experts.gate_up_proj`
[E, H, 2I]) as several stored tensors (FP8 values + block scales; MXFP4 blocks + scales).
`logical_tensors(checkpoint)` gives the logical view of every checkpoint, plain ones included,
and `decode(logical, stored)` turns the stored tensors of one logical tensor into its float32
values, exactly as transformers' dequantization does. One module per format:

    spec        Logical: one logical tensor, its stored parts and its format
    registry    formats by quant_method; logical_tensors, decode, quantized_keys, checks
    fp8_block   quant_method "fp8": E4M3/E5M2 weights, `weight_scale_inv` per block
    mxfp4       quant_method "mxfp4" (gpt-oss): `*_blocks` (E2M1 pairs) + `*_scales` (E8M0)
    compressed  quant_method "compressed-tensors" (llm-compressor outputs), decoded by the
                compressed-tensors library itself

Each format also encodes (`fp8_block.encode`, `mxfp4.encode`), so experts changed by merge or
a refit are written back as the source stores them (`moekit.surgery.stored`).
`registry.check_quantization(config)` refuses a `quantization_config` moekit cannot read.
"""

from moekit.formats.registry import (
    check_quantization,
    decode,
    is_quantized,
    logical_tensors,
    quantized_formats,
    quantized_keys,
    quantized_parts,
)
from moekit.formats.spec import Logical

__all__ = ["Logical", "check_quantization", "decode", "is_quantized", "logical_tensors",
           "quantized_formats", "quantized_keys", "quantized_parts"]
