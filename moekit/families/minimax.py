"""MiniMax-M2: sigmoid router with a block-level selection bias, Mixtral naming on disk."""

from moekit.families.mixtral import MIXTRAL_EXPERTS
from moekit.families.spec import ConfigKeys, MoeFamily, RouterSpec

MINIMAX_M2 = MoeFamily(
    name="minimax_m2",
    model_types=("minimax_m2",),
    architectures=("MiniMaxM2ForCausalLM",),
    keys=ConfigKeys(num_experts=("num_local_experts", "num_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="block_sparse_moe.gate.weight", module="mlp.gate",
                      experts_module="mlp.experts", scoring="sigmoid", renorm="always",
                      selection_bias="block_sparse_moe.e_score_correction_bias"),
    experts=MIXTRAL_EXPERTS,
)
