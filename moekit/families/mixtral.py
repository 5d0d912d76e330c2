"""Mixtral: softmax router, top-k renormalised, per-expert w1/w3/w2 under block_sparse_moe."""

from moekit.families.spec import ConfigKeys, ExpertLayout, MoeFamily, RouterSpec

MIXTRAL_EXPERTS = ExpertLayout(
    fused=False, prefixes=("block_sparse_moe.experts",),
    projections={"gate": "w1", "up": "w3", "down": "w2"})

MIXTRAL = MoeFamily(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    keys=ConfigKeys(num_experts=("num_local_experts", "num_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="block_sparse_moe.gate.weight", module="mlp.gate",
                      experts_module="mlp.experts", scoring="softmax", renorm="always"),
    experts=MIXTRAL_EXPERTS,
    dense_source=("llama", "mistral"),
)
