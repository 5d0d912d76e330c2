"""Tiny checkpoints of every supported family, built offline from config classes."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    pad_token_id=2,
)
NO_HEAD_DIM = {k: v for k, v in COMMON.items() if k != "head_dim"}
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)

TINY_MOE: dict[str, dict] = {
    "mixtral": dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(COMMON, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "qwen3_moe": dict(COMMON, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3_next": dict(COMMON, num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "linear_attention", "linear_attention",
                                    "full_attention"]),
    "qwen3_5_moe_text": dict(COMMON, num_hidden_layers=4, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64, num_experts=8,
                             num_experts_per_tok=2, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=16,
                             linear_value_head_dim=16,
                             layer_types=["linear_attention", "linear_attention",
                                          "linear_attention", "full_attention"]),
    "deepseek_v2": dict(NO_HEAD_DIM, **MLA, num_hidden_layers=3, intermediate_size=128,
                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.0),
    "deepseek_v3": dict(NO_HEAD_DIM, **MLA, num_hidden_layers=3, intermediate_size=128,
                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm4_moe": dict(COMMON, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                     topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                     routed_scaling_factor=1.5),
    "olmoe": dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2),
    "gpt_oss": dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                    num_experts_per_tok=2, sliding_window=16),
    "llama4_text": dict(COMMON, num_hidden_layers=2, intermediate_size=32,
                        intermediate_size_mlp=64, num_local_experts=8, num_experts_per_tok=1,
                        interleave_moe_layer_step=1),
    "granitemoe": dict(NO_HEAD_DIM, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                       num_experts_per_tok=2),
    "phimoe": dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                   num_experts_per_tok=2),
    "ernie4_5_moe": dict(COMMON, num_hidden_layers=3, intermediate_size=128,
                         moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=1),
    "minimax_m2": dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                       num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8,
                           moe_topk=2),
}

TINY_DENSE: dict[str, dict] = {
    "llama": dict(COMMON, num_hidden_layers=2, intermediate_size=64),
    "mistral": dict(COMMON, num_hidden_layers=2, intermediate_size=64),
    "qwen2": dict(COMMON, num_hidden_layers=2, intermediate_size=64),
    "qwen3": dict(COMMON, num_hidden_layers=2, intermediate_size=64),
    "gemma2": dict(COMMON, num_hidden_layers=2, intermediate_size=64),
    "gemma3_text": dict(COMMON, num_hidden_layers=2, intermediate_size=64),
}
MOE_TYPES = list(TINY_MOE)
DENSE_TYPES = list(TINY_DENSE)


def build_model(model_type: str, seed: int = 0, **overrides):
    """A random-initialised float32 CausalLM of `model_type` (tiny sizes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {**TINY_MOE.get(model_type, {}), **TINY_DENSE.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(model_type: str, out: Path, seed: int = 0, with_tokenizer: bool = True,
              **overrides) -> Path:
    """Save a tiny checkpoint (Hub on-disk layout) and, optionally, a byte-level tokenizer."""
    model = build_model(model_type, seed=seed, **overrides)
    # Stored in float32 with random init, but nudge routers so routing is not degenerate.
    model.save_pretrained(out)
    if with_tokenizer:
        tokenizer().save_pretrained(out)
    return out


_TOKENIZER = None


def tokenizer():
    """A byte-level BPE tokenizer of VOCAB tokens trained offline on stdlib docstrings."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        corpus = _docstring_corpus()
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<|bos|>", "<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>",
            pad_token="<|pad|>", model_max_length=256)
    return _TOKENIZER


def _docstring_corpus() -> list[str]:
    import importlib

    lines: list[str] = []
    for name in ["os", "re", "json", "collections", "itertools", "functools", "pathlib"]:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                lines += [line for line in doc.splitlines() if line.strip()]
    return lines


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# --- small models with really trained routing -------------------------------------------------

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
TRAINED_VOCAB, TRAINED_SEQ, TRAINED_STEPS, TRAINED_LR = 512, 64, 200, 1e-2
TRAINED: dict[str, tuple[str, dict]] = {
    # 2 layers x 8 experts (top-2) of width 64: the routers specialise by domain in 200 steps.
    "moe": ("mixtral", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_local_experts=8, num_experts_per_tok=2,
                            router_aux_loss_coef=0.01)),
    # Width 128: narrower ones give hidden states too alike for a data-driven upcycle router.
    "dense": ("qwen3", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}


def save_trained(kind: str, out: Path, seed: int = 0) -> Path:
    """Train the TRAINED[kind] model on the three sample_data/ domains (first 90% of each) for
    TRAINED_STEPS seeded steps on one thread (a few CPU seconds) and save it with its tokenizer.

    Uses the demo's training loop (scripts/build_demo_model.py), at a smaller size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    demo = _demo_module()
    splits = demo.load_domains(SAMPLE_DATA)
    tok = demo.train_tokenizer([train for train, _ in splits.values()], TRAINED_VOCAB, 256)
    streams = {d: demo.encode(tok, train) for d, (train, _) in splits.items()}
    model_type, params = TRAINED[kind]
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), max_position_embeddings=256,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        demo.train_lm(model, streams, TRAINED_STEPS, seed=seed, seq=TRAINED_SEQ,
                      peak_lr=TRAINED_LR)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _demo_module():
    """scripts/build_demo_model.py, imported by path (scripts/ is not a package)."""
    import importlib.util
    import sys

    if "build_demo_model" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_model.py"
        spec = importlib.util.spec_from_file_location("build_demo_model", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_demo_model"] = module
        spec.loader.exec_module(module)
    return sys.modules["build_demo_model"]


def unread_embedding(folder: Path) -> int:
    """Input-embedding parameters a token does not read (all rows but one) when the checkpoint
    stores an untied `lm_head.weight`, computed from the file's tensors: what `inspect`
    leaves out of the active count."""
    from safetensors import safe_open

    config = read_config(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        tables = [k for k in keys if k.endswith("embed_tokens.weight") and ".layers." not in k]
        if "lm_head.weight" not in keys or config.get("tie_word_embeddings") is True:
            return 0
        rows, cols = f.get_slice(tables[0]).get_shape()
    return rows * cols - cols
