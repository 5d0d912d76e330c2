"""OLMoE: softmax router, optional renormalisation, Qwen naming on disk."""

from moekit.families.qwen import QWEN_EXPERTS
from moekit.families.spec import ConfigKeys, MoeFamily, RouterSpec

OLMOE = MoeFamily(
    name="olmoe", model_types=("olmoe",), architectures=("OlmoeForCausalLM",),
    keys=ConfigKeys(num_experts=("num_experts", "num_local_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="mlp.gate.weight", module="mlp.gate", experts_module="mlp.experts",
                      scoring="softmax", renorm="config"),
    experts=QWEN_EXPERTS,
)
