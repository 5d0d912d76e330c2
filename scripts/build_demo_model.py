#!/usr/bin/env python3
"""Build the demo checkpoint: a tiny Mixtral trained on the three sample_data domains.

Fully offline. Trains a byte-level BPE tokenizer, then a small MixtralForCausalLM for a fixed
wall-clock budget, and saves both as a normal Hugging Face folder. Example:

    .venv/bin/python scripts/build_demo_model.py --out demo_out/model --seconds 90
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402

DOMAINS = ("en_bible", "code_py", "en_docs")
DATA_DIR = Path(__file__).resolve().parent.parent / "sample_data"
EOS = "<|endoftext|>"
VOCAB, SEQ, BATCH_PER_DOMAIN, PEAK_LR, WARMUP = 2048, 128, 4, 3e-3, 20


def split_text(text: str, frac: float = 0.9) -> tuple[str, str]:
    """Split at the first line break after `frac` of the text: (train, held-out)."""
    cut = text.find("\n", int(len(text) * frac)) + 1 or len(text)
    return text[:cut], text[cut:]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `<|endoftext|>` as id 0 (bos, eos and pad)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for t in texts for line in t.splitlines(keepends=True)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, model_max_length=512)


def build_model(vocab_size: int) -> MixtralForCausalLM:
    """A ~2.3M-parameter Mixtral: 4 layers, 8 experts, top-2."""
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
        router_aux_loss_coef=0.01, output_router_logits=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, attention_dropout=0.1, dtype="float32",
    )
    return MixtralForCausalLM(config)


def windows(ids: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` random SEQ-token windows from a 1-D token stream."""
    starts = torch.randint(0, len(ids) - SEQ, (n,), generator=gen)
    return torch.stack([ids[s:s + SEQ] for s in starts.tolist()])


def lr_at(step: int, progress: float) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 10% of the peak."""
    warm = min(1.0, (step + 1) / WARMUP)
    return PEAK_LR * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, batch: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token cross-entropy (nats) and top-1 expert counts, shape (layers, experts)."""
    model.eval()
    out = model(batch, output_router_logits=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).item()
    n_exp = model.config.num_local_experts
    counts = torch.stack([torch.bincount(r.argmax(-1), minlength=n_exp)
                          for r in out.router_logits]).float()
    model.train()
    return ce, counts


def unigram_xent(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats) of `val` under the add-one unigram distribution of `train`."""
    logp = torch.log((torch.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab))
    return -logp[val].mean().item()


def mutual_info(counts: torch.Tensor) -> float:
    """Mutual information (bits) between domain (rows) and expert (columns) of a count table."""
    p = counts / counts.sum()
    indep = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    mask = p > 0
    return (p[mask] * torch.log2(p[mask] / indep[mask])).sum().item()


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless `overwrite`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        sys.exit(f"error: {out} exists and is not empty (pass --overwrite to replace it)")


def main(argv: list[str] | None = None) -> None:
    """Parse options, train, report and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out/model"))
    ap.add_argument("--seconds", type=float, default=90.0, help="training budget (wall clock)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="train exactly this many steps instead (fully reproducible)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the domain .txt files")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    prepare_out(args.out, args.overwrite)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t0 = time.monotonic()

    splits = {d: split_text((args.data / f"{d}.txt").read_text(encoding="utf-8")) for d in DOMAINS}
    tokenizer = train_tokenizer([tr for tr, _ in splits.values()])
    vocab = len(tokenizer)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    train = {d: encode(tr) for d, (tr, _) in splits.items()}
    val = {d: encode(va) for d, (_, va) in splits.items()}
    for d in DOMAINS:
        print(f"{d:9s} train {len(train[d]):6d} tok  val {len(val[d]):5d} tok  unigram "
              f"xent {unigram_xent(train[d], val[d], vocab):.3f}")

    model = build_model(vocab).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {vocab}")
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.5)
    gen = torch.Generator().manual_seed(args.seed)
    step, start, last_log, seen = 0, time.monotonic(), time.monotonic(), []
    while True:
        progress = step / args.steps if args.steps else (time.monotonic() - start) / args.seconds
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress)
        batch = torch.cat([windows(train[d], BATCH_PER_DOMAIN, gen) for d in DOMAINS])
        batch = batch[torch.randperm(len(batch), generator=gen)]
        out = model(batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen.append((out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item(),
                     out.aux_loss.item()))
        step += 1
        if time.monotonic() - last_log >= 10:
            ce, aux = (sum(x) / len(seen) for x in zip(*seen, strict=True))
            elapsed = time.monotonic() - start
            val_ce = sum(evaluate(model, v[: 8 * SEQ].view(8, SEQ))[0] for v in val.values())
            print(f"step {step:5d}  {elapsed:5.1f}s  lr {lr_at(step, progress):.2e}  train ce "
                  f"{ce:.3f}  val ce {val_ce / len(val):.3f}  aux {aux:.3f}", flush=True)
            last_log, seen = time.monotonic(), []
    print(f"trained {step} steps in {time.monotonic() - start:.1f}s")
    if step < 300:
        print("warning: few steps (busy CPU?); routing may not have specialised. "
              "Raise --seconds or pass --steps 600.")

    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    usage: dict[str, torch.Tensor] = {}
    print(f"{'domain':9s} {'train ce':>8s} {'val ce':>7s} {'unigram':>7s}")
    for d in DOMAINS:
        train_ce, _ = evaluate(model, windows(train[d], 16, eval_gen))
        n_val = len(val[d]) // SEQ
        val_ce, usage[d] = evaluate(model, val[d][: n_val * SEQ].view(n_val, SEQ))
        print(f"{d:9s} {train_ce:8.3f} {val_ce:7.3f} {unigram_xent(train[d], val[d], vocab):7.3f}")
    n_exp = model.config.num_local_experts
    print("top-1 expert usage on held-out text (% of tokens per domain)")
    for layer in range(model.config.num_hidden_layers):
        table = torch.stack([usage[d][layer] for d in DOMAINS])
        print(f"layer {layer:<5d}" + " ".join(f"{f'e{e}':>4s}" for e in range(n_exp))
              + f"   MI {mutual_info(table):.2f} bits")
        for d, row in zip(DOMAINS, table, strict=True):
            print(f"  {d:9s}" + " ".join(f"{v:4.0f}" for v in 100 * row / row.sum()))

    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    tmp = args.out.parent / f".{args.out.name}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        prepare_out(args.out, args.overwrite)
        if args.out.is_dir():
            shutil.rmtree(args.out)
        elif args.out.exists():
            args.out.unlink()
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved {args.out} ({time.monotonic() - t0:.1f}s total)")


if __name__ == "__main__":
    main()
