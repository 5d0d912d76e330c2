"""Dense decoder families that can be upcycled into MoE checkpoints."""

from moekit.families.spec import DenseFamily

_MLP = {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}


def _dense(name: str, model_types: tuple[str, ...], architectures: tuple[str, ...]) -> DenseFamily:
    return DenseFamily(name=name, model_types=model_types, architectures=architectures, mlp=_MLP)


LLAMA = _dense("llama", ("llama",), ("LlamaForCausalLM",))
MISTRAL = _dense("mistral", ("mistral",), ("MistralForCausalLM",))
QWEN2 = _dense("qwen2", ("qwen2",), ("Qwen2ForCausalLM",))
QWEN3 = _dense("qwen3", ("qwen3",), ("Qwen3ForCausalLM",))
GEMMA2 = _dense("gemma2", ("gemma2",), ("Gemma2ForCausalLM",))
GEMMA3 = _dense("gemma3", ("gemma3_text", "gemma3"),
                ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"))

DENSE_FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3)
