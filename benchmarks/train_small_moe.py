#!/usr/bin/env python3
"""Train a small MoE of another family on the FIRST HALF of each text of a folder (offline).

Families (all from transformers config classes, trained from scratch for a wall-clock budget):
- `qwen3_moe`: 32 experts, top-4, renormalised softmax;
- `gpt_oss`: 8 experts, top-2, biased router, top-k on logits then softmax, expert biases;
- `deepseek_v3`: 16 experts in 4 groups (2 allowed), top-2, sigmoid + selection bias
  (the bias is a buffer that gradients do not train: it is set by a loss-free balancing update,
  b_e += 1e-3 * sign(mean load - load_e) per step, as in DeepSeek-V3), one shared expert;
- `qwen2_moe`: 8 experts, top-2, no renorm, gated shared expert.
Texts: every `.txt` of `--texts` (default `sample_data/`; the fixture texts, ~35k tokens per
domain, overfit far later). The second half of each text stays unseen, for evaluation
(`bench_prune_quality.py --model ... --texts` the same folder).
Reuses the demo trainer's tokenizer, windows, learning-rate schedule and report helpers.

Checkpoints: every `--save-every` seconds (and at the end) the loss on the first 8 windows of each
held-out half is measured and, when it is the lowest so far (early stopping: ~10k training tokens
per domain overfit within a few hundred steps), the model is written to `--out` through a
temporary sibling folder (a stopped run leaves the best complete model), with
`trainer_state.pt` (optimizer, step, elapsed time, sampler state) beside it; `--resume` continues
from that kept checkpoint, with the schedule's progress = max(step / steps, elapsed / seconds)
carried over (a larger `--seconds` on resume stretches the remaining cosine decay). Threads:
`--threads`, default `$OMP_NUM_THREADS` or 1. At the end it prints, on the held-out second halves,
the loss per domain beside the unigram cross-entropy, and per layer the mutual information (bits)
between domain and the selected experts (0 = routing ignores the domain). Keep outputs outside
git. Example:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/train_small_moe.py qwen3_moe \
        --texts ../shared/fixtures/text --out ../models/qwen3_moe --steps 3000 --seconds 1500
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
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
SEQ, BATCH_PER_DOMAIN = 128, 4  # 512 tokens per domain a step: cheaper per token than 64 x 2
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


def save(model: torch.nn.Module, tokenizer, out: Path, state: dict) -> None:  # noqa: ANN001
    """Write model, tokenizer and `trainer_state.pt` to a temporary sibling, then swap it in."""
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.output_router_logits = False
    model.save_pretrained(tmp)
    model.config.output_router_logits = True
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build(args: argparse.Namespace, texts: dict[str, str]):  # noqa: ANN201
    """(model, tokenizer, optimizer, state) fresh, or from `--out` with `--resume`."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    state = {"step": 0, "elapsed": 0.0, "gen": None}
    if args.resume and (args.out / "trainer_state.pt").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
        model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
        model.config.output_router_logits = True
        state = torch.load(args.out / "trainer_state.pt", weights_only=False)
    else:
        tokenizer = demo.train_tokenizer(list(texts.values()))
        config = AutoConfig.for_model(args.family, vocab_size=len(tokenizer),
                                      **FAMILIES[args.family])
        model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=demo.PEAK_LR, betas=(0.9, 0.95),
                            weight_decay=0.1)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    return model.train(), tokenizer, opt, state


@torch.no_grad()
def held_out_loss(model, val: dict[str, torch.Tensor], seq: int, n: int = 8) -> float:  # noqa: ANN001
    """Mean LM loss over the first `n` held-out windows of every domain (progress log)."""
    model.eval()
    loss = sum(model(ids[: n * seq].view(n, seq), labels=ids[: n * seq].view(n, seq),
                     output_router_logits=False).loss.item() for ids in val.values())
    model.train()
    return loss / len(val)


def train(args: argparse.Namespace, model, tokenizer, opt, state: dict,  # noqa: ANN001
          train_ids: dict[str, torch.Tensor], val: dict[str, torch.Tensor]) -> None:
    """AdamW steps until step/steps or elapsed/seconds reaches 1; checkpoints on the way."""
    gen = torch.Generator().manual_seed(args.seed)
    if state["gen"] is not None:
        gen.set_state(state["gen"])
    step, start, last_save = state["step"], time.monotonic() - state["elapsed"], time.monotonic()
    coef = getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0
    while (progress := max(step / args.steps, (time.monotonic() - start) / args.seconds)) < 1:
        for group in opt.param_groups:
            group["lr"] = demo.lr_at(step, progress)
        batch = torch.cat([demo.windows(ids, args.batch_per_domain, gen, args.seq)
                           for ids in train_ids.values()])
        out = model(batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.family == "deepseek_v3":
            balance_bias(model, batch)
        step += 1
        if step % 50 == 0:
            aux = out.aux_loss.item() if getattr(out, "aux_loss", None) is not None else 0.0
            print(f"step {step} {time.monotonic() - start:.0f}s lm loss "
                  f"{out.loss.item() - coef * aux:.3f}", flush=True)
        done = max(step / args.steps, (time.monotonic() - start) / args.seconds) >= 1
        if done or time.monotonic() - last_save > args.save_every:
            loss = held_out_loss(model, val, args.seq)
            print(f"checkpoint at step {step}: held-out loss {loss:.3f}", flush=True)
            if loss < state.get("best", float("inf")):
                state = {"step": step, "elapsed": time.monotonic() - start, "best": loss,
                         "gen": gen.get_state(), "opt": opt.state_dict()}
                save(model, tokenizer, args.out, state)
            last_save = time.monotonic()
    print(f"{args.family}: {step} steps, {time.monotonic() - start:.0f} s trained "
          f"(seq {args.seq} x {args.batch_per_domain * len(train_ids)} per step)", flush=True)


@torch.no_grad()
def report(model, train_ids: dict[str, torch.Tensor], val: dict[str, torch.Tensor],  # noqa: ANN001
           seq: int) -> None:
    """Held-out loss vs unigram per domain; per layer MI(domain; selected experts) in bits."""
    counts: dict[int, dict[str, torch.Tensor]] = {}
    domain = [""]

    def hook(mod, args, layer):  # noqa: ANN001, ANN202
        ids = args[1].reshape(-1)
        n = int(getattr(mod, "num_experts", 0) or ids.max() + 1)
        table = counts.setdefault(layer, {})
        table[domain[0]] = table.get(domain[0], 0) + torch.bincount(ids, minlength=n)[:n]

    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: hook(mod, a, i))
               for i, m in enumerate(experts)]
    model.eval().config.output_router_logits = False
    vocab = model.config.vocab_size
    print(f"{'domain':9s} {'val loss':>8s} {'unigram':>7s}")
    for d, ids in val.items():
        domain[0] = d
        n = min(len(ids) // seq, 64)
        loss = model(ids[: n * seq].view(n, seq), labels=ids[: n * seq].view(n, seq)).loss
        print(f"{d:9s} {loss.item():8.3f} {demo.unigram_xent(train_ids[d], ids, vocab):7.3f}")
    for handle in handles:
        handle.remove()
    mi = [demo.mutual_info(torch.stack([t[d] for d in val]).float()) for t in counts.values()]
    print("MI(domain; experts) per MoE layer, bits: " + " ".join(f"{v:.2f}" for v in mi))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=900.0, help="wall-clock cap (all runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texts", type=Path, default=demo.DATA_DIR,
                    help="folder of .txt domains, trained on their first halves (default: "
                    "sample_data/, ~10k tokens per domain: it overfits within ~200 steps)")
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--batch-per-domain", type=int, default=BATCH_PER_DOMAIN)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--save-every", type=float, default=300.0, help="checkpoint period (s)")
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    demo.hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    halves = {f.stem: demo.split_text(f.read_text(encoding="utf-8"), 0.5)
              for f in sorted(args.texts.glob("*.txt"))}
    model, tokenizer, opt, state = build(args, {d: h[0] for d, h in halves.items()})
    train_ids = {d: demo.encode(tokenizer, h[0]) for d, h in halves.items()}
    val = {d: demo.encode(tokenizer, h[1]) for d, h in halves.items()}
    train(args, model, tokenizer, opt, state, train_ids, val)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    print(f"kept: step {torch.load(args.out / 'trainer_state.pt', weights_only=False)['step']}")
    report(model, train_ids, val, args.seq)
    print(f"saved {args.out}")


if __name__ == "__main__":
    sys.exit(main())
