#!/usr/bin/env python3
"""A synthetic Qwen3-MoE at Qwen3-30B-A3B's width, for the cost of the calibrated path.

Qwen3-30B-A3B's layer shape (hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of
width 768, top-8, renormalised softmax) with `--layers` decoder layers (2 by default: its 48
are extrapolated from per-layer costs), random weights (cost only: routing is meaningless),
the fixtures' 8192-token tokenizer (so `--data` works with the fixture texts), bfloat16 as
the real checkpoint. About 1.25 GB per layer.

    .venv/bin/python benchmarks/build_wide_moe.py --out /tmp/wide --layers 2
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models" / "mixtral-e16k2"
SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
             num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
             vocab_size=8192, max_position_embeddings=4096, tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=0)


def build(out: Path, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(num_hidden_layers=layers, **SHAPE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    build(args.out, args.layers)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
