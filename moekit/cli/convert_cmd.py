"""`moekit convert MODEL --out OUT --dtype bf16|fp16|fp32 --experts fused|per-expert`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from moekit.cli.common import (
    JsonOpt,
    MaxShardSizeOpt,
    MaybeOutOpt,
    ModelArg,
    OverwriteOpt,
    RevisionOpt,
    console,
    handle_errors,
    load_model_path,
    local_inputs,
)
from moekit.units import human, parse_size


@handle_errors
def convert(
    model: ModelArg,
    out: MaybeOutOpt = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="bf16, fp16 or fp32: every float tensor in this dtype; quantized "
        "tensors (FP8 blocks, MXFP4) are decoded and quantization_config removed.")] = None,
    experts: Annotated[str | None, typer.Option(
        "--experts", help="fused (transformers 5's gate_up_proj/down_proj) or per-expert (the "
        "Hub's experts.{j}.* keys): the routed experts' layout, moved as bytes.")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="fp8: decoder linear weights as FP8 E4M3 with 128x128 block scales "
        "(weight + weight_scale_inv, as DeepSeek-V3 ships); mxfp4: the routed experts as "
        "MXFP4 blocks + scales (as gpt-oss ships).")] = None,
    quantize_layers: Annotated[str | None, typer.Option(
        "--quantize-layers", help="With --quantize: linear (default: every decoder linear "
        "layer but the routers) or experts (routed experts only).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print tensor count, bytes in/out and the config change; write "
        "nothing.")] = False,
    overwrite: OverwriteOpt = False,
    max_shard_size: MaxShardSizeOpt = "5GB",
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a checkpoint in another dtype, as FP8 blocks or in another expert layout.

    Streamed: one tensor is in memory at a time; tensors that do not change are byte copies.
    Tokenizer and side files are copied; provenance and a model card are written.

    Example: moekit convert ./DeepSeek-V3-FP8 --dtype bf16 --out ./dsv3-bf16

    Example: moekit convert ./gpt-oss-20b --dtype bf16 --dry-run

    Example: moekit convert ./mixtral-fused --experts per-expert --out ./mixtral

    Example: moekit convert ./Qwen3-30B-A3B --quantize fp8 --quantize-layers experts --out ./q8
    """
    from moekit.errors import InvalidArgumentError
    from moekit.io.output import check_outputs
    from moekit.ops.convert import check_request

    target = check_request(dtype, experts, quantize, quantize_layers)
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    if not dry_run and out is None:
        raise InvalidArgumentError("--out is required (or use --dry-run)")
    source = load_model_path(model, revision)
    check_outputs(local_inputs(source), None if dry_run else out, overwrite)
    from moekit.io.reader import Checkpoint
    from moekit.ops.convert import plan_convert

    scope = quantize_layers or ("experts" if quantize == "mxfp4" else "linear")
    plan = plan_convert(Checkpoint(source), target, experts, quantize, scope)
    if dry_run:
        _show(plan.summary(), None, as_json)
        return
    assert out is not None
    request = dict(dtype=target, experts=experts, quantize=quantize,
                   scope=scope if quantize else None)
    result = _run(source, model, out, request, overwrite, shard_bytes)
    _show(result.plan.summary(), result.out, as_json)


def _run(source: Path, model: str, out: Path, request: dict[str, Any], overwrite: bool,
         shard_bytes: int) -> Any:
    from moekit.cli.progress import byte_progress
    from moekit.ops.convert import convert_checkpoint

    with byte_progress() as on_bytes:
        return convert_checkpoint(source, out, **request, overwrite=overwrite,
                                  max_shard_bytes=shard_bytes, on_bytes=on_bytes,
                                  source_name=model)


def _show(summary: dict[str, Any], out: Path | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"out": str(out) if out else None, **summary}, indent=2))
        return
    actions = ", ".join(f"{n} {a}" for a, n in summary["actions"].items())
    verb = f"[bold green]wrote[/] {out}" if out else "[bold]would write[/]"
    console.print(f"{verb}: {summary['tensors_out']} tensors ({actions}) from "
                  f"{summary['tensors_in']}; {human(summary['bytes_in'])} in, "
                  f"{human(summary['bytes_out'])} out")
    console.print("config: " + ("; ".join(summary["config_changes"]) or "unchanged"))
