"""`convert`: a checkpoint rewritten tensor by tensor into another dtype (quantized tensors
decoded) and/or another expert layout, streamed like prune (one tensor in memory at a time)
and staged like every output (`io/output.write_model_folder`: fsync, rename, whole or nothing).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import InvalidArgumentError
from moekit.formats import check_quantization
from moekit.io.output import write_model_folder
from moekit.io.reader import Checkpoint
from moekit.io.writer import DEFAULT_SHARD_BYTES, OutTensor
from moekit.ops.convert.items import CONFIG_DTYPES, DTYPES, checkpoint_items, out_tensors
from moekit.ops.convert.quantize import (
    BLOCK,
    FORMATS,
    SCOPES,
    chosen,
    chosen_mxfp4,
    fp8_tensors,
    mxfp4_tensors,
    quantization_config,
    unquantized_modules,
)
from moekit.ops.convert.records import write_convert_records
from moekit.ops.convert.relayout import LAYOUTS, relayout

DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass
class ConvertPlan:
    """What a conversion writes: output tensors (source byte order), input tensors/bytes read,
    the new config and its changes (human lines), and output tensors per action."""

    tensors: list[OutTensor]
    inputs: int
    bytes_in: int
    config: dict[str, Any]
    config_changes: list[str]
    actions: dict[str, int]

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def summary(self) -> dict[str, Any]:
        return {"tensors_in": self.inputs, "tensors_out": len(self.tensors),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "actions": self.actions, "config_changes": self.config_changes}


@dataclass
class ConvertResult:
    out: Path
    plan: ConvertPlan
    extra: dict[str, Any] = field(default_factory=dict)


def check_request(dtype: str | None, experts: str | None, quantize: str | None = None,
                  scope: str | None = None) -> str | None:
    """The safetensors dtype asked for (None: kept); refuses unknown values, --dtype with
    --quantize, --quantize-layers without --quantize, and no request at all."""
    if scope is not None and (quantize is None or scope not in SCOPES):
        raise InvalidArgumentError(f"--quantize-layers {scope!r} needs --quantize fp8 and is "
                                   "linear or experts", "pass --quantize fp8 --quantize-layers "
                                   "linear|experts")
    if dtype is None and experts is None and quantize is None:
        raise InvalidArgumentError("convert: nothing to do", "pass --dtype bf16|fp16|fp32, "
                                   "--quantize fp8 and/or --experts fused|per-expert")
    if quantize is not None and quantize not in FORMATS:
        raise InvalidArgumentError(f"--quantize {quantize!r} is not a format convert writes",
                                   "use --quantize fp8 (128x128 blocks, E4M3) or mxfp4 "
                                   "(gpt-oss experts)")
    if quantize == "mxfp4" and scope not in (None, "experts"):
        raise InvalidArgumentError("--quantize mxfp4 stores the routed experts only",
                                   "drop --quantize-layers or pass experts")
    if quantize is not None and dtype is not None:
        raise InvalidArgumentError("--dtype and --quantize are given together",
                                   "--dtype dequantizes, --quantize quantizes: give one")
    if experts is not None and experts not in LAYOUTS:
        raise InvalidArgumentError(f"--experts {experts!r} is not a layout",
                                   "use fused or per-expert")
    if dtype is None:
        return None
    if dtype.lower() not in DTYPES:
        raise InvalidArgumentError(f"--dtype {dtype!r} is not a format convert writes",
                                   "use bf16, fp16 or fp32")
    return DTYPES[dtype.lower()]


def plan_convert(checkpoint: Checkpoint, dtype: str | None, experts: str | None,
                 quantize: str | None = None, scope: str = "linear") -> ConvertPlan:
    """Plan every output tensor and the config from headers only; refuses a conversion that
    would change nothing. `quantize` "fp8": the `scope` weights (linear, experts) as FP8
    blocks; "mxfp4": the fused expert stacks as MXFP4 (`quantize.py`)."""
    quantization = check_quantization(checkpoint.config)
    if quantize is not None and quantization is not None:
        raise InvalidArgumentError(f"--quantize {quantize}: {checkpoint.folder.name} is already "
                                   f"quantized ({quantization['quant_method']})",
                                   "convert --dtype bf16 first, then --quantize the result")
    items = checkpoint_items(checkpoint)
    if experts is not None:
        items = relayout(checkpoint, items, experts)
    to_fp8 = chosen(checkpoint, items, scope) if quantize == "fp8" else set()
    to_mxfp4 = chosen_mxfp4(checkpoint, items) if quantize == "mxfp4" else set()
    consumed = {key for item in items.values() for key in item.inputs}
    missing = sorted(set(checkpoint.tensors) - consumed)
    if missing:
        raise InvalidArgumentError(f"tensor '{missing[0]}' would not be written (internal error)")
    ordered = sorted(items.values(), key=lambda i: (str(i.first.shard), i.first.start))
    tensors: list[OutTensor] = []
    actions: dict[str, int] = {}
    for item in ordered:
        if item.name in to_fp8 or item.name in to_mxfp4:
            outs = fp8_tensors(item) if item.name in to_fp8 else mxfp4_tensors(item)
            how = "quantized"
        else:
            outs, how = out_tensors(item, dtype)
        tensors += outs
        actions[how] = actions.get(how, 0) + len(outs)
    config, changes = patch_config(checkpoint.config, dtype, quantization is not None)
    if to_fp8:
        config["quantization_config"] = quantization_config(unquantized_modules(items, to_fp8))
        changes.append(f"quantization_config (fp8, blocks {BLOCK[0]}x{BLOCK[1]}) added")
    if to_mxfp4:
        config["quantization_config"] = quantization_config(
            unquantized_modules(items, to_mxfp4), "mxfp4")
        changes.append("quantization_config (mxfp4, experts) added")
    plan = ConvertPlan(tensors, len(checkpoint.tensors),
                       sum(i.nbytes for i in checkpoint.tensors.values()), config, changes,
                       dict(sorted(actions.items())))
    if set(actions) == {"copied"} and not changes:
        raise InvalidArgumentError(f"convert: nothing to do, {checkpoint.folder.name} is "
                                   "already stored that way", "choose another --dtype or "
                                   "--experts")
    return plan


def patch_config(config: dict[str, Any], dtype: str | None, quantized: bool
                 ) -> tuple[dict[str, Any], list[str]]:
    """config.json for the output: with a dtype, `quantization_config` removed and the
    config's dtype (`dtype` / `torch_dtype`, whichever it has; else `torch_dtype`) set."""
    new, changes = copy.deepcopy(config), []
    if dtype is None:
        return new, changes
    if quantized:
        method = new.pop("quantization_config").get("quant_method")
        changes.append(f"quantization_config ({method}) removed")
    name = CONFIG_DTYPES[dtype]
    keys = [k for k in DTYPE_KEYS if k in new] or ["torch_dtype"]
    for key in keys:
        if new.get(key) != name:
            changes.append(f"{key}: {new.get(key)} -> {name}")
            new[key] = name
    return new, changes


def convert_checkpoint(source: Path, out: Path, *, dtype: str | None = None,
                       experts: str | None = None, quantize: str | None = None,
                       scope: str | None = "linear", overwrite: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       on_bytes: Callable[[int, int], None] | None = None,
                       source_name: str | None = None) -> ConvertResult:
    """Write `source` converted into `out` (staged: whole or nothing). `dtype`: a safetensors
    float dtype (BF16, F16, F32) or None; `experts`: fused, per-expert or None; `quantize`:
    "fp8" (the `scope` weights, linear or experts, as FP8 blocks) or None.
    Provenance and model card name the model as `source_name` (the user's folder or repo
    id; default `source`)."""
    checkpoint = Checkpoint(source)
    plan = plan_convert(checkpoint, dtype, experts, quantize, scope or "linear")
    result = ConvertResult(Path(out), plan)
    write_model_folder(checkpoint, Path(out), plan.tensors, plan.config, overwrite=overwrite,
                       max_shard_bytes=max_shard_bytes, on_bytes=on_bytes,
                       finish=lambda folder: write_convert_records(
                           folder, source_name or str(source), plan.summary(),
                           dict(dtype=dtype, experts=experts, quantize=quantize,
                                scope=scope if quantize else None),
                           source_folder=Path(source)))
    return result
