"""Llama-4 (text): top-k on logits then sigmoid, input scaled by the score; fused transposed."""

from moekit.families.spec import ConfigKeys, ExpertLayout, MoeFamily, RouterSpec

LLAMA4 = MoeFamily(
    name="llama4", model_types=("llama4_text", "llama4"),
    architectures=("Llama4ForCausalLM", "Llama4ForConditionalGeneration"),
    keys=ConfigKeys(num_experts=("num_local_experts", "num_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="feed_forward.router.weight", module="feed_forward.router",
                      experts_module="feed_forward.experts", scoring="sigmoid", topk_first=True,
                      renorm="never", note="the score scales the expert input",
                      logits_index=1, input_scaled=True),
    experts=ExpertLayout(fused=True, prefixes=("feed_forward.experts.",),
                         projections={"gate_up": "feed_forward.experts.gate_up_proj",
                                      "down": "feed_forward.experts.down_proj"},
                         transposed=True),
    shared_prefixes=("feed_forward.shared_expert.",),
    notes="MoE layers from moe_layers / interleave_moe_layer_step; one shared expert per MoE layer",
)
