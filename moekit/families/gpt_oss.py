"""gpt-oss: biased router, top-k on logits then softmax; fused transposed interleaved experts."""

from moekit.families.spec import ConfigKeys, ExpertLayout, MoeFamily, RouterSpec

GPT_OSS = MoeFamily(
    name="gpt_oss", model_types=("gpt_oss",), architectures=("GptOssForCausalLM",),
    keys=ConfigKeys(num_experts=("num_local_experts", "num_experts"),
                    top_k=("num_experts_per_tok",), expert_width=("intermediate_size",)),
    router=RouterSpec(weight="mlp.router.weight", bias="mlp.router.bias", module="mlp.router",
                      experts_module="mlp.experts", scoring="softmax", topk_first=True,
                      renorm="always"),
    experts=ExpertLayout(fused=True, prefixes=("mlp.experts.",),
                         projections={"gate_up": "mlp.experts.gate_up_proj",
                                      "down": "mlp.experts.down_proj"},
                         transposed=True, interleaved=True),
    notes="MXFP4 checkpoints (*_blocks, *_scales) are sliced on the expert axis like the rest",
)
