"""ERNIE-4.5-MoE: softmax router, selection bias in moe_statics, shared experts."""

from moekit.families.qwen import QWEN_EXPERTS
from moekit.families.spec import ConfigKeys, MoeFamily, RouterSpec

ERNIE4_5_MOE = MoeFamily(
    name="ernie4_5_moe", model_types=("ernie4_5_moe",), architectures=("Ernie4_5_MoeForCausalLM",),
    keys=ConfigKeys(num_experts=("moe_num_experts", "num_experts"), top_k=("moe_k",
                    "num_experts_per_tok"), expert_width=("moe_intermediate_size",),
                    num_shared=("moe_num_shared_experts",)),
    router=RouterSpec(weight="mlp.gate.weight", module="mlp.gate", experts_module="mlp.experts",
                      scoring="softmax", renorm="always",
                      selection_bias="mlp.moe_statics.e_score_correction_bias"),
    experts=QWEN_EXPERTS, shared_prefixes=("mlp.shared_experts.",),
    notes="selection bias is stored [1, E] (sliced on its last axis)",
)
