"""Measured expert loads in the files that serving engines' expert-parallel balancers read.

The load of expert e in layer l is `tokens[l, e]`, the routed slots of the profile (domain `all`
unless another is chosen): exactly what the engines count per forward pass.

- **SGLang** (sgl-project/sglang `python/sglang/srt/eplb/expert_location.py`,
  `compute_initial_expert_location_metadata`): `--init-expert-location FILE` accepts a `.pt`
  (`torch.load(weights_only=True)`) or `.json` mapping with key `logical_count`, a
  `[num_layers, num_logical_experts]` (or `[passes, num_layers, num_logical_experts]`) count
  tensor, handed to `ExpertLocationMetadata.init_by_eplb`. Layers are indexed by decoder layer id
  (all `num_hidden_layers`; dense layers count zero), as in the `.pt` dumps of
  `python/sglang/srt/eplb/expert_distribution.py`.
- **vLLM** (vllm-project/vllm `vllm/distributed/eplb/eplb_state.py`): the rebalancer consumes
  `global_expert_load_window`, an integer tensor `[num_moe_layers, num_logical_experts]` (the
  window of `expert_load_pass` summed and mapped physical -> logical), passed as `weight` to the
  policy's `rebalance_experts`. Written as that one tensor in a safetensors file; layers are MoE
  layers in order (the MoE layer ids are in the file metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import StatsError

if TYPE_CHECKING:
    import numpy as np

    from moekit.stats.profile import Profile

FORMATS = {"vllm": (".safetensors",), "sglang": (".json", ".pt")}
VLLM_KEY = "global_expert_load_window"
SGLANG_KEY = "logical_count"


def expert_loads(profile: Profile, domain: str = "all") -> np.ndarray:
    """Routed-slot counts `[num_moe_layers, E]` int64, rows in `profile.moe_layers` order."""
    import numpy as np

    if domain != "all" and domain not in profile.domains:
        raise StatsError(f"the profile has no domain '{domain}'",
                         f"choose one of {['all', *profile.domains]}")
    rows = [profile.experts(layer, domain)["tokens"].to_numpy() for layer in profile.moe_layers]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise StatsError(f"MoE layers have different expert counts {sorted(widths)}",
                         "serving-engine load files need one expert count for every layer")
    return np.stack(rows).astype(np.int64)


def sglang_logical_count(profile: Profile, domain: str = "all") -> np.ndarray:
    """`[num_layers, E]` int64 indexed by decoder layer id; layers without experts are zero."""
    import numpy as np

    loads = expert_loads(profile, domain)
    num_layers = int(profile.metadata.get("num_layers", max(profile.moe_layers) + 1))
    full = np.zeros((num_layers, loads.shape[1]), dtype=np.int64)
    full[profile.moe_layers] = loads
    return full


def export_loads(profile: Profile, fmt: str, path: Path, domain: str = "all") -> Path:
    """Write the loads for engine `fmt` ("vllm" | "sglang") to `path` (atomic: temp + rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if fmt not in FORMATS:
        raise StatsError(f"unknown export format '{fmt}'", f"choose one of {sorted(FORMATS)}")
    if suffix not in FORMATS[fmt]:
        raise StatsError(f"{fmt} load files are {' or '.join(FORMATS[fmt])}, not '{suffix}'",
                         f"name the file *{FORMATS[fmt][0]}")
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "vllm":
        _write_vllm(profile, tmp, domain)
    elif suffix == ".json":
        tmp.write_text(json.dumps({SGLANG_KEY: sglang_logical_count(profile, domain).tolist()}))
    else:
        import torch

        counts = torch.from_numpy(sglang_logical_count(profile, domain))
        torch.save({SGLANG_KEY: counts}, tmp)
    os.replace(tmp, path)
    return path


def _write_vllm(profile: Profile, path: Path, domain: str) -> None:
    import torch
    from safetensors.torch import save_file

    loads = torch.from_numpy(expert_loads(profile, domain)).contiguous()
    save_file({VLLM_KEY: loads}, str(path), metadata={
        "moekit_format": "vllm-eplb-load-v1", "moe_layers": json.dumps(profile.moe_layers),
        "domain": domain, "model_fingerprint": profile.fingerprint})
