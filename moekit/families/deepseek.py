"""DeepSeek-V2/V3 and GLM-4.5 (also Kimi-K2): group-limited routing, shared experts, MLA."""

from moekit.families.qwen import QWEN_EXPERTS
from moekit.families.spec import ConfigKeys, MoeFamily, RouterSpec

_KEYS = ConfigKeys(num_experts=("n_routed_experts", "num_local_experts", "num_experts"),
                   top_k=("num_experts_per_tok",), expert_width=("moe_intermediate_size",),
                   num_shared=("n_shared_experts",))
_SHARED = ("mlp.shared_experts.",)

DEEPSEEK_V2 = MoeFamily(
    name="deepseek_v2", model_types=("deepseek_v2",), architectures=("DeepseekV2ForCausalLM",),
    keys=_KEYS,
    router=RouterSpec(weight="mlp.gate.weight", module="mlp.gate", experts_module="mlp.experts",
                      scoring="softmax", renorm="never", grouped=True, scaled=True,
                      note="topk_method greedy or group_limited_greedy; norm_topk_prob ignored"),
    experts=QWEN_EXPERTS, shared_prefixes=_SHARED, attention="mla",
)
_V3_ROUTER = RouterSpec(weight="mlp.gate.weight", module="mlp.gate", experts_module="mlp.experts",
                        scoring="sigmoid", renorm="config", grouped=True, scaled=True,
                        selection_bias="mlp.gate.e_score_correction_bias")
DEEPSEEK_V3 = MoeFamily(
    name="deepseek_v3", model_types=("deepseek_v3", "kimi_k2"),
    architectures=("DeepseekV3ForCausalLM",),
    keys=_KEYS, router=_V3_ROUTER, experts=QWEN_EXPERTS, shared_prefixes=_SHARED,
    attention="mla", notes="Kimi-K2 ships this architecture",
)
GLM4_MOE = MoeFamily(
    name="glm4_moe", model_types=("glm4_moe",), architectures=("Glm4MoeForCausalLM",),
    keys=_KEYS, router=_V3_ROUTER, experts=QWEN_EXPERTS, shared_prefixes=_SHARED,
)
