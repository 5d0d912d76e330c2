#!/usr/bin/env python3
"""Train a small MoE of another family on the FIRST HALF of the sample_data texts (offline).

Families (all from transformers config classes, trained from scratch for a wall-clock budget):
- `qwen3_moe`: 32 experts, top-4, renormalised softmax;
- `gpt_oss`: 8 experts, top-2, biased router, top-k on logits then softmax, expert biases;
- `deepseek_v3`: 16 experts in 4 groups (2 allowed), top-2, sigmoid + selection bias
  (the bias is a buffer that gradients do not train: it is set by a loss-free balancing update,
  b_e += 1e-3 * sign(mean load - load_e) per step, as in DeepSeek-V3), one shared expert;
- `qwen2_moe`: 8 experts, top-2, no renorm, gated shared expert.
The second half of each text stays unseen, for evaluation (`bench_prune_quality.py --model`).
Reuses the demo trainer's tokenizer, windows and learning-rate schedule. Keep outputs outside
git (e.g. /tmp). Example:

    .venv/bin/python benchmarks/train_small_moe.py qwen3_moe --out /tmp/moe/qwen3 --steps 300
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "build_demo_model.py")
demo = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(demo)  # type: ignore[union-attr]

COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
SEQ, BATCH_PER_DOMAIN = 64, 2  # small on purpose: the machine has 2 shared cores
FAMILIES = {
    "qwen3_moe": dict(COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=32,
                      num_experts_per_tok=4, norm_topk_prob=True, router_aux_loss_coef=0.01,
                      output_router_logits=True),
    "gpt_oss": dict(COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=64, router_aux_loss_coef=0.01, output_router_logits=True),
    "deepseek_v3": dict({k: v for k, v in COMMON.items() if k != "head_dim"},
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, intermediate_size=128,
                        moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5),
    "qwen2_moe": dict(COMMON, intermediate_size=128, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, router_aux_loss_coef=0.01, output_router_logits=True),
}


def balance_bias(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """DeepSeek-V3 loss-free balancing of `e_score_correction_bias` from one batch's loads."""
    loads: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "e_score_correction_bias"):
            def hook(mod, args, out, name=name):  # noqa: ANN001, ANN202
                loads[name] = torch.bincount(out[2].reshape(-1), minlength=mod.num_experts)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(batch[:2])
        for name, module in model.named_modules():
            if name in loads:
                load = loads[name].float()
                module.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
    for handle in handles:
        handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=900.0, help="wall-clock cap")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    demo.hf_logging.set_verbosity_error()
    demo.SEQ = SEQ
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    texts = {d: demo.split_text((demo.DATA_DIR / f"{d}.txt").read_text(), 0.5)[0]
             for d in demo.DOMAINS}
    tokenizer = demo.train_tokenizer(list(texts.values()))
    train = {d: torch.tensor(tokenizer(t)["input_ids"]) for d, t in texts.items()}
    config = AutoConfig.for_model(args.family, vocab_size=len(tokenizer),
                                  **FAMILIES[args.family])
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=demo.PEAK_LR, betas=(0.9, 0.95),
                            weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.monotonic()
    while (progress := max(step / args.steps, (time.monotonic() - start) / args.seconds)) < 1:
        for group in opt.param_groups:
            group["lr"] = demo.lr_at(step, progress)
        batch = torch.cat([demo.windows(train[d], BATCH_PER_DOMAIN, gen)
                           for d in demo.DOMAINS])
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.family == "deepseek_v3":
            balance_bias(model, batch)
        step += 1
        if step % 50 == 0:
            print(f"step {step} {time.monotonic() - start:.0f}s loss {loss.item():.3f}",
                  flush=True)
    print(f"{args.family}: {step} steps in {time.monotonic() - start:.0f} s, last loss "
          f"{loss.item():.3f}")
    model.config.output_router_logits = False
    model.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    sys.exit(main())
