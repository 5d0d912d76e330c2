"""Hunyuan-MoE-V1: softmax router (Linear at mlp.gate.wg), one shared MLP."""

from moekit.families.qwen import QWEN_EXPERTS
from moekit.families.spec import ConfigKeys, MoeFamily, RouterSpec

HUNYUAN_V1_MOE = MoeFamily(
    name="hunyuan_v1_moe", model_types=("hunyuan_v1_moe",),
    architectures=("HunYuanMoEV1ForCausalLM",),
    keys=ConfigKeys(num_experts=("num_experts", "num_local_experts"),
                    top_k=("moe_topk", "num_experts_per_tok"),
                    expert_width=("moe_intermediate_size", "intermediate_size"),
                    num_shared=("num_shared_expert",)),
    router=RouterSpec(weight="mlp.gate.wg.weight", module="mlp.gate", experts_module="mlp.experts",
                      scoring="softmax", renorm="always"),
    experts=QWEN_EXPERTS, shared_prefixes=("mlp.shared_mlp.",),
    notes="moe_topk may be a per-layer list",
)
