"""`moekit convert`: dtype conversion (quantized tensors decoded through `moekit.formats`) and
expert layout (fused <-> per-expert), streamed tensor by tensor. Modules:

    items      output tensors: quantized logical tensors or byte ranges, cast when written
    relayout   routed experts between per-expert keys and fused gate_up_proj/down_proj
    quantize   --quantize fp8|mxfp4: which weights are quantized, FP8-block / MXFP4 encoding,
               config
    run        the plan (headers only), config patch, staged write
    records    provenance and model card
"""

from moekit.ops.convert.run import (
    ConvertPlan,
    ConvertResult,
    check_request,
    convert_checkpoint,
    plan_convert,
)

__all__ = ["ConvertPlan", "ConvertResult", "check_request", "convert_checkpoint", "plan_convert"]
