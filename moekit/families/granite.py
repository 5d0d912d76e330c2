"""Granite-MoE: top-k on logits then softmax; fused input_linear/output_linear on disk."""

from moekit.families.spec import ConfigKeys, ExpertLayout, MoeFamily, RouterSpec

GRANITEMOE = MoeFamily(
    name="granitemoe", model_types=("granitemoe",), architectures=("GraniteMoeForCausalLM",),
    keys=ConfigKeys(num_experts=("num_local_experts", "num_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="block_sparse_moe.router.layer.weight",
                      module="block_sparse_moe.router", experts_module="block_sparse_moe.experts",
                      scoring="softmax", topk_first=True, renorm="always"),
    experts=ExpertLayout(fused=True,
                         prefixes=("block_sparse_moe.input_linear.",
                                   "block_sparse_moe.output_linear."),
                         projections={"gate_up": "block_sparse_moe.input_linear.weight",
                                      "down": "block_sparse_moe.output_linear.weight"}),
)
