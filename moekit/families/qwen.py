"""Qwen MoE families: per-expert gate/up/down_proj under mlp.experts, softmax routers."""

from moekit.families.spec import ConfigKeys, ExpertLayout, MoeFamily, RouterSpec

QWEN_EXPERTS = ExpertLayout(
    fused=False, prefixes=("mlp.experts",),
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
_SHARED = ("mlp.shared_expert.", "mlp.shared_expert_gate.")
_KEYS = ConfigKeys(num_experts=("num_experts", "num_local_experts"),
                   top_k=("num_experts_per_tok",), expert_width=("moe_intermediate_size",),
                   shared_width=("shared_expert_intermediate_size",))


def _router(renorm: str) -> RouterSpec:
    return RouterSpec(weight="mlp.gate.weight", module="mlp.gate", experts_module="mlp.experts",
                      scoring="softmax", renorm=renorm)  # type: ignore[arg-type]


QWEN2_MOE = MoeFamily(
    name="qwen2_moe", model_types=("qwen2_moe",), architectures=("Qwen2MoeForCausalLM",),
    keys=_KEYS, router=_router("config"), experts=QWEN_EXPERTS, shared_prefixes=_SHARED,
    dense_source=("qwen2",),
    notes="shared expert with a sigmoid gate; MoE layers: mlp_only_layers, decoder_sparse_step",
)
QWEN3_MOE = MoeFamily(
    name="qwen3_moe", model_types=("qwen3_moe",), architectures=("Qwen3MoeForCausalLM",),
    keys=_KEYS, router=_router("config"), experts=QWEN_EXPERTS, dense_source=("qwen3",),
)
QWEN3_NEXT = MoeFamily(
    name="qwen3_next", model_types=("qwen3_next",), architectures=("Qwen3NextForCausalLM",),
    keys=_KEYS, router=_router("config"), experts=QWEN_EXPERTS, shared_prefixes=_SHARED,
    attention="hybrid-linear",
)
QWEN3_5_MOE = MoeFamily(
    name="qwen3_5_moe", model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    architectures=("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
    keys=_KEYS, router=_router("always"), experts=QWEN_EXPERTS, shared_prefixes=_SHARED,
    attention="hybrid-linear",
)
