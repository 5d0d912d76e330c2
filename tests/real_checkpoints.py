"""Header-only (sparse) checkpoints with the exact tensor names, shapes and dtypes the Hub
stores for real models, built from their config.json (tests/real_configs/*.json). The data
region is a hole: gigabytes on paper, no disk used. `_published` in each config holds the
numbers the model's authors state, with their source."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

CONFIGS = Path(__file__).parent / "real_configs"
Tensors = dict[str, tuple[str, list[int]]]


def gpt_oss(c: dict) -> Tensors:
    """gpt-oss: attention with biases and sinks (BF16), router (BF16), experts MXFP4 fused."""
    h, i, e, v = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out = _outside(h, v)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h),
                                 ("o_proj", h, q)):
            out[f"{p}self_attn.{name}.weight"] = ("BF16", [rows, cols])
            out[f"{p}self_attn.{name}.bias"] = ("BF16", [rows])
        out[f"{p}self_attn.sinks"] = ("BF16", [c["num_attention_heads"]])
        out[f"{p}input_layernorm.weight"] = ("BF16", [h])
        out[f"{p}post_attention_layernorm.weight"] = ("BF16", [h])
        out[f"{p}mlp.router.weight"] = ("BF16", [e, h])
        out[f"{p}mlp.router.bias"] = ("BF16", [e])
        for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            out[f"{p}mlp.experts.{name}_blocks"] = ("U8", [e, rows, cols // 32, 16])
            out[f"{p}mlp.experts.{name}_scales"] = ("U8", [e, rows, cols // 32])
            out[f"{p}mlp.experts.{name}_bias"] = ("BF16", [e, rows])
    return out


def deepseek_v3(c: dict) -> Tensors:
    """DeepSeek-V3: MLA attention and every linear in FP8 with 128x128 block scales (router,
    norms, embeddings BF16/F32), dense first layers, MTP block as layer num_hidden_layers."""
    h, v = c["hidden_size"], c["vocab_size"]
    out = _outside(h, v)
    for n in range(c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{n}."
        out.update(_mla(c, p))
        out[f"{p}input_layernorm.weight"] = ("BF16", [h])
        out[f"{p}post_attention_layernorm.weight"] = ("BF16", [h])
        if n < c["first_k_dense_replace"]:
            out.update(_fp8_mlp(f"{p}mlp.", h, c["intermediate_size"]))
            continue
        out[f"{p}mlp.gate.weight"] = ("BF16", [c["n_routed_experts"], h])
        out[f"{p}mlp.gate.e_score_correction_bias"] = ("F32", [c["n_routed_experts"]])
        for j in range(c["n_routed_experts"]):
            out.update(_fp8_mlp(f"{p}mlp.experts.{j}.", h, c["moe_intermediate_size"]))
        out.update(_fp8_mlp(f"{p}mlp.shared_experts.", h,
                            c["moe_intermediate_size"] * c["n_shared_experts"]))
        if n >= c["num_hidden_layers"]:  # the MTP block's own tensors
            out[f"{p}embed_tokens.weight"] = ("BF16", [v, h])
            out[f"{p}enorm.weight"] = ("BF16", [h])
            out[f"{p}hnorm.weight"] = ("BF16", [h])
            out[f"{p}eh_proj.weight"] = ("BF16", [h, 2 * h])
            out[f"{p}shared_head.norm.weight"] = ("BF16", [h])
            out[f"{p}shared_head.head.weight"] = ("BF16", [v, h])
    return out


def _fp8(name: str, rows: int, cols: int) -> Tensors:
    return {f"{name}.weight": ("F8_E4M3", [rows, cols]),
            f"{name}.weight_scale_inv": ("F32", [math.ceil(rows / 128), math.ceil(cols / 128)])}


def _fp8_mlp(p: str, h: int, i: int) -> Tensors:
    return {**_fp8(f"{p}gate_proj", i, h), **_fp8(f"{p}up_proj", i, h),
            **_fp8(f"{p}down_proj", h, i)}


def _outside(h: int, v: int) -> Tensors:
    return {"model.embed_tokens.weight": ("BF16", [v, h]), "model.norm.weight": ("BF16", [h]),
            "lm_head.weight": ("BF16", [v, h])}


def _mla(c: dict, p: str) -> Tensors:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    a = f"{p}self_attn."
    return {**_fp8(f"{a}q_a_proj", c["q_lora_rank"], h),
            f"{a}q_a_layernorm.weight": ("BF16", [c["q_lora_rank"]]),
            **_fp8(f"{a}q_b_proj", heads * qk, c["q_lora_rank"]),
            **_fp8(f"{a}kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            f"{a}kv_a_layernorm.weight": ("BF16", [c["kv_lora_rank"]]),
            **_fp8(f"{a}kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                   c["kv_lora_rank"]),
            **_fp8(f"{a}o_proj", h, heads * c["v_head_dim"])}


def from_transformers(c: dict) -> Tensors:
    """The Hub layout of any family transformers defines: the model built on the meta device
    from the config (no memory), its state dict turned back into the on-disk names and shapes
    by transformers' own `revert_weight_conversion` (what `save_pretrained` writes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    params = {k: v for k, v in c.items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model(c["model_type"], **params)
    auto = AutoModelForCausalLM
    if "vision_config" in c:  # a multimodal checkpoint (Llama-4): the whole model, vision too
        from transformers import AutoModelForImageTextToText as auto
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.bfloat16)
    state = revert_weight_conversion(model, model.state_dict())
    if c.get("tie_word_embeddings"):  # the Hub stores a tied head once, as the embedding
        state.pop("lm_head.weight", None)
    return {k: ("BF16", list(v.shape)) for k, v in state.items()}


def with_mtp_block(c: dict) -> Tensors:
    """transformers' Hub layout plus the multi-token-prediction block it does not build: GLM-4.5
    stores it as layer `num_hidden_layers` (a copy of the last decoder layer's tensors with
    `eh_proj` [H, 2H], `enorm`, `hnorm`, `shared_head.norm`, the names vLLM's GLM-4.5 MTP loader
    reads); Qwen3-Next under `mtp.` (one full-attention MoE decoder layer `mtp.layers.0`,
    `mtp.fc` [H, 2H], `mtp.norm`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`)."""
    out = from_transformers(c)
    h, n = c["hidden_size"], c["num_hidden_layers"]
    if c["model_type"] == "qwen3_next":
        source, block = f"model.layers.{c['full_attention_interval'] - 1}.", "mtp."
        out.update({f"{block}layers.0.{k[len(source):]}": v for k, v in list(out.items())
                    if k.startswith(source)})
        extras = {"fc.weight": [h, 2 * h], "norm.weight": [h],
                  "pre_fc_norm_embedding.weight": [h], "pre_fc_norm_hidden.weight": [h]}
    else:
        source, block = f"model.layers.{n - 1}.", f"model.layers.{n}."
        out.update({block + k[len(source):]: v for k, v in list(out.items())
                    if k.startswith(source)})
        extras = {"eh_proj.weight": [h, 2 * h], "enorm.weight": [h], "hnorm.weight": [h],
                  "shared_head.norm.weight": [h]}
    out.update({block + k: ("BF16", shape) for k, shape in extras.items()})
    return out


BUILDERS: dict[str, tuple[str, Callable[[dict], Tensors]]] = {
    "gpt-oss-20b": ("gpt-oss-20b.json", gpt_oss),
    "gpt-oss-120b": ("gpt-oss-120b.json", gpt_oss),
    "deepseek-v3": ("deepseek-v3.json", deepseek_v3),
    "kimi-k2": ("kimi-k2.json", deepseek_v3),
    "glm-4.5-air": ("glm-4.5-air.json", with_mtp_block),
    "qwen3-next-80b-a3b": ("qwen3-next-80b-a3b.json", with_mtp_block),
    **{name: (f"{name}.json", from_transformers) for name in (
        "mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "olmoe-1b-7b", "phi-3.5-moe",
        "granite-3.1-3b-a800m", "llama-4-scout-17b-16e")},
}
ITEM = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}


def write_real(name: str, folder: Path) -> tuple[Path, dict]:
    """The sparse checkpoint of catalogue entry `name` in `folder`; returns (folder, published)."""
    file, builder = BUILDERS[name]
    config = json.loads((CONFIGS / file).read_text())
    published = config.pop("_published")
    folder.mkdir(parents=True, exist_ok=True)
    write_sparse(folder / "model.safetensors", builder(config))
    (folder / "config.json").write_text(json.dumps(config))
    return folder, published


def write_sparse(path: Path, tensors: Tensors) -> int:
    """A safetensors file with a valid header and a hole where the data would be; returns
    the number of parameters it declares."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        size = math.prod(shape) * ITEM[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return sum(math.prod(shape) for _, shape in tensors.values())
