"""Phi-3.5-MoE: `sparsemixer` top-2 routing, Mixtral naming on disk (router saved as gate)."""

from moekit.families.mixtral import MIXTRAL_EXPERTS
from moekit.families.spec import ConfigKeys, MoeFamily, RouterSpec

PHIMOE = MoeFamily(
    name="phimoe",
    model_types=("phimoe",),
    architectures=("PhimoeForCausalLM",),
    keys=ConfigKeys(num_experts=("num_local_experts", "num_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="block_sparse_moe.gate.weight", module="mlp.router",
                      experts_module="mlp.experts", scoring="softmax", renorm="never",
                      note="sparsemixer: each weight is a masked softmax, not renormalised"),
    experts=MIXTRAL_EXPERTS,
)
