"""Serving engines' expert loads in: an SGLang or vLLM load dump becomes a profile folder.

Read (the formats `serving.export_loads` writes, as the engines write them):
- **SGLang** `.pt` (`torch.load(weights_only=True)`) or `.json` mapping with `logical_count`,
  `[num_layers, E]` or `[passes, num_layers, E]` (passes are summed), indexed by decoder layer
  id: the MoE layers' rows are taken, a dense layer's row must be zero;
- **vLLM** safetensors with `global_expert_load_window`, `[num_moe_layers, E]` or
  `[window, num_moe_layers, E]` (the window is summed), rows = MoE layers in order.

The profile holds what the dump has and nothing else: `tokens` per (layer, expert) (routed
slots), positions per layer = slots / top-k; the output-norm sums (`weight_sum`, `ean_sum`,
`reap_sum`, `max_norm`), entropy and co-activation are unknown (NaN / zero) and
`metadata["usage_only"]` is set, so only `--criterion frequency` (and usage plots, load
balance, undersampling intervals by layer) apply.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.recorder import LayerRaw
from moekit.errors import StatsError
from moekit.stats.profile_io import profile_from_raw
from moekit.stats.serving import FORMATS, SGLANG_KEY, VLLM_KEY

if TYPE_CHECKING:
    import numpy as np

    from moekit.families.layout import ModelLayout


def read_loads(path: Path, fmt: str) -> np.ndarray:
    """Counts `[num_layers_in_file, E]` int64 from an SGLang or vLLM dump (passes summed)."""
    import numpy as np

    path = Path(path)
    if fmt not in FORMATS:
        raise StatsError(f"unknown import format '{fmt}'", f"choose one of {sorted(FORMATS)}")
    if path.suffix.lower() not in FORMATS[fmt]:
        raise StatsError(f"{fmt} load files are {' or '.join(FORMATS[fmt])}, not "
                         f"'{path.suffix}'", f"pass the {fmt} dump itself")
    raw = _read_raw(path, fmt)
    try:
        counts = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise StatsError(f"{path.name}: the load counts are not a numeric array",
                         f"pass an unmodified {fmt} dump") from err
    if counts.ndim == 3:
        counts = counts.sum(axis=0)
    if counts.ndim != 2 or counts.size == 0:
        raise StatsError(f"{path.name}: load counts of shape {list(counts.shape)}; expected "
                         "[layers, experts] or [passes, layers, experts]",
                         f"pass an unmodified {fmt} dump")
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts != np.round(counts)).any():
        raise StatsError(f"{path.name}: load counts must be non-negative integers",
                         f"pass an unmodified {fmt} dump")
    return counts.astype(np.int64)


def _read_raw(path: Path, fmt: str) -> Any:
    key = VLLM_KEY if fmt == "vllm" else SGLANG_KEY
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix.lower() == ".pt":
            import torch

            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            data = load_file(str(path))
    except (OSError, ValueError, RuntimeError, EOFError) as err:  # also SafetensorError
        raise StatsError(f"cannot read {path.name} as a {fmt} dump: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                         f"pass an unmodified {fmt} dump") from err
    if not isinstance(data, dict) or key not in data:
        raise StatsError(f"{path.name} has no '{key}'", f"pass a {fmt} expert-load dump")
    value = data[key]
    return value.numpy() if hasattr(value, "numpy") else value


def moe_rows(counts: np.ndarray, fmt: str, layout: ModelLayout, name: str) -> np.ndarray:
    """The dump's rows of the model's MoE layers `[num_moe_layers, E]`, checked against it."""
    moe = [layer.index for layer in layout.moe_layers]
    experts = {layer.num_experts for layer in layout.moe_layers}
    if len(experts) != 1 or counts.shape[1] != next(iter(experts)):
        raise StatsError(f"{name} counts {counts.shape[1]} experts per layer; the model has "
                         f"{sorted(experts)}", "import a dump recorded on this model")
    if fmt == "vllm":
        if counts.shape[0] != len(moe):
            raise StatsError(f"{name} has {counts.shape[0]} MoE layers; the model has "
                             f"{len(moe)}", "import a dump recorded on this model")
        return counts
    if counts.shape[0] != layout.num_layers:
        raise StatsError(f"{name} has {counts.shape[0]} layers; the model has "
                         f"{layout.num_layers}", "import a dump recorded on this model")
    dense = [i for i in range(layout.num_layers) if i not in moe and counts[i].any()]
    if dense:
        raise StatsError(f"{name} counts routed tokens in layer(s) {dense[:4]}, which have no "
                         "experts in this model", "import a dump recorded on this model")
    return counts[moe]


def profile_from_loads(loads: np.ndarray, layout: ModelLayout, fingerprint: str, *,
                       fmt: str, source: Path, domain: str) -> Any:
    """A usage-only Profile of `loads` `[num_moe_layers, E]` (see the module docstring)."""
    import numpy as np

    top_k = [layout.top_k(i) for i in range(len(layout.moe_layers))]
    raw = []
    for row, (layer, k) in enumerate(zip(layout.moe_layers, top_k, strict=True)):
        e = layer.num_experts
        nan = np.full((1, e), np.nan)
        raw.append(LayerRaw(
            layer.index, e, loads[row][None].astype(np.int64), nan, nan, nan, nan,
            np.zeros((1, e, e), dtype=np.int64), np.array([int(loads[row].sum()) // k]),
            np.array([np.nan]), np.array([0]), np.array([0])))
    sha = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    positions = int(loads[0].sum()) // top_k[0] if len(loads) else 0
    metadata = {
        "format_version": 1, "model_fingerprint": fingerprint, "family": layout.family.name,
        "model_type": str(layout.config.get("model_type", "")), "num_layers": layout.num_layers,
        "moe_layers": [layer.index for layer in layout.moe_layers],
        "num_experts": layout.moe_layers[0].num_experts,
        "top_k": top_k[0] if len(set(top_k)) == 1 else top_k,
        "usage_only": True, "imported": {"format": fmt, "file": str(source), "sha256": sha},
        "domains": {domain: {"tokens": positions, "sha256": sha, "files": [str(source)],
                             "windows": 0}},
    }
    return profile_from_raw(raw, [domain], metadata)
