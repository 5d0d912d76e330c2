#!/usr/bin/env python3
"""Build the demo checkpoint: a tiny Mixtral trained on the three sample_data domains.

Fully offline and reproducible: trains a byte-level BPE tokenizer, then a small MixtralForCausalLM
for a fixed number of seeded steps on a fixed number of CPU threads, and saves both as a normal
Hugging Face folder. The same seed and step count give the same weights on every run. Example:

    .venv/bin/python scripts/build_demo_model.py --out demo_out/model --steps 600
    .venv/bin/python scripts/build_demo_model.py --dense --out demo_out/dense  # for upcycle

The test suite imports `train_tokenizer`, `load_domains` and `train_lm` from here to build its
small trained models (tests/tiny_models.py).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: no slowdown on a busy CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

DOMAINS = ("en_bible", "code_py", "en_docs")
DATA_DIR = Path(__file__).resolve().parent.parent / "sample_data"
EOS = "<|endoftext|>"
VOCAB, SEQ, BATCH_PER_DOMAIN, PEAK_LR, WARMUP = 2048, 128, 4, 3e-3, 20
STEPS, THREADS = 600, 2


def split_text(text: str, frac: float = 0.9) -> tuple[str, str]:
    """Split at the first line break after `frac` of the text: (train, held-out)."""
    cut = text.find("\n", int(len(text) * frac)) + 1 or len(text)
    return text[:cut], text[cut:]


def load_domains(folder: Path = DATA_DIR, frac: float = 0.9) -> dict[str, tuple[str, str]]:
    """{domain: (train text, held-out text)} for the DOMAINS files of `folder`."""
    return {d: split_text((folder / f"{d}.txt").read_text(encoding="utf-8"), frac)
            for d in DOMAINS}


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB,
                    max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `<|endoftext|>` as id 0 (bos, eos and pad); deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for t in texts for line in t.splitlines(keepends=True)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, model_max_length=max_length)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Token ids of `text`, shape (n,), without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
                        dtype=torch.long)


def build_dense(vocab_size: int) -> Qwen3ForCausalLM:
    """A ~1.5M-parameter dense Qwen3 (4 layers, FFN width 512) to try `moekit upcycle` on."""
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attention_dropout=0.1, dtype="float32")
    return Qwen3ForCausalLM(config)


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


def windows(ids: torch.Tensor, n: int, gen: torch.Generator, seq: int = SEQ) -> torch.Tensor:
    """`n` random `seq`-token windows from a 1-D token stream, shape (n, seq)."""
    starts = torch.randint(0, len(ids) - seq, (n,), generator=gen)
    return torch.stack([ids[s:s + seq] for s in starts.tolist()])


def lr_at(step: int, progress: float, peak: float = PEAK_LR) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 10% of the peak."""
    warm = min(1.0, (step + 1) / WARMUP)
    return peak * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_lm(model: PreTrainedModel, train: dict[str, torch.Tensor], steps: int, seed: int = 0,
             seq: int = SEQ, batch_per_domain: int = BATCH_PER_DOMAIN, peak_lr: float = PEAK_LR,
             log: Callable[[int, float, float], None] | None = None) -> None:
    """Train `model` in place for exactly `steps` AdamW steps on mixed-domain batches.

    Each step draws `batch_per_domain` random windows of `seq` tokens from every stream of
    `train` (seeded by `seed`), so equal arguments give equal weights on a fixed thread count.
    `log(step, lm_loss, aux_loss)` is called after every step. MoE models (config with
    `router_aux_loss_coef`) are trained with their load-balancing loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.5)
    gen = torch.Generator().manual_seed(seed)
    moe = getattr(model.config, "router_aux_loss_coef", None) is not None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, step / steps, peak_lr)
        batch = torch.cat([windows(ids, batch_per_domain, gen, seq) for ids in train.values()])
        batch = batch[torch.randperm(len(batch), generator=gen)]
        out = model(batch, labels=batch, **({"output_router_logits": True} if moe else {}))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        aux = out.aux_loss.item() if moe and out.aux_loss is not None else 0.0
        if log is not None:
            log(step + 1, out.loss.item() - (model.config.router_aux_loss_coef * aux
                                             if moe else 0.0), aux)
    model.eval()


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, batch: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token cross-entropy (nats) and top-1 expert counts, shape (layers, experts)."""
    out = model(batch, output_router_logits=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).item()
    n_exp = model.config.num_local_experts
    counts = torch.stack([torch.bincount(r.argmax(-1), minlength=n_exp)
                          for r in out.router_logits]).float()
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


def make_deterministic(seed: int, threads: int = THREADS) -> None:
    """Seed torch, pin the thread count and ask for deterministic kernels (CPU)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)


def report(model: MixtralForCausalLM, train: dict[str, torch.Tensor],
           val: dict[str, torch.Tensor], seed: int) -> None:
    """Print train/held-out cross-entropy per domain and top-1 expert usage per layer."""
    vocab, n_exp = model.config.vocab_size, model.config.num_local_experts
    eval_gen = torch.Generator().manual_seed(seed + 1)
    usage: dict[str, torch.Tensor] = {}
    print(f"{'domain':9s} {'train ce':>8s} {'val ce':>7s} {'unigram':>7s}")
    for d in train:
        train_ce, _ = evaluate(model, windows(train[d], 16, eval_gen))
        n_val = len(val[d]) // SEQ
        val_ce, usage[d] = evaluate(model, val[d][: n_val * SEQ].view(n_val, SEQ))
        print(f"{d:9s} {train_ce:8.3f} {val_ce:7.3f} {unigram_xent(train[d], val[d], vocab):7.3f}")
    print("top-1 expert usage on held-out text (% of tokens per domain)")
    for layer in range(model.config.num_hidden_layers):
        table = torch.stack([usage[d][layer] for d in train])
        print(f"layer {layer:<5d}" + " ".join(f"{f'e{e}':>4s}" for e in range(n_exp))
              + f"   MI {mutual_info(table):.2f} bits")
        for d, row in zip(train, table, strict=True):
            print(f"  {d:9s}" + " ".join(f"{v:4.0f}" for v in 100 * row / row.sum()))


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: Path,
         overwrite: bool) -> None:
    """Write model + tokenizer to a temporary sibling of `out`, then rename it to `out`."""
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        prepare_out(out, overwrite)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Parse options, train, report and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out/model"))
    ap.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"CPU threads (default {THREADS}; the weights depend on it)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the domain .txt files")
    ap.add_argument("--dense", action="store_true",
                    help="a dense Qwen3 instead (a source for `moekit upcycle`)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    prepare_out(args.out, args.overwrite)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    make_deterministic(args.seed, args.threads)
    t0 = time.monotonic()

    splits = load_domains(args.data)
    tokenizer = train_tokenizer([tr for tr, _ in splits.values()])
    vocab = len(tokenizer)
    train = {d: encode(tokenizer, tr) for d, (tr, _) in splits.items()}
    val = {d: encode(tokenizer, va) for d, (_, va) in splits.items()}
    for d in DOMAINS:
        print(f"{d:9s} train {len(train[d]):6d} tok  val {len(val[d]):5d} tok  unigram "
              f"xent {unigram_xent(train[d], val[d], vocab):.3f}")

    model = build_dense(vocab) if args.dense else build_model(vocab)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {vocab}, {args.steps} steps, seed "
          f"{args.seed}, {args.threads} threads")
    seen: list[tuple[float, float]] = []

    def log(step: int, ce: float, aux: float) -> None:
        seen.append((ce, aux))
        if step % 100 == 0 or step == args.steps:
            mean_ce, mean_aux = (sum(x) / len(seen) for x in zip(*seen, strict=True))
            print(f"step {step:5d}  {time.monotonic() - t0:5.1f}s  train ce {mean_ce:.3f}  "
                  f"aux {mean_aux:.3f}", flush=True)
            seen.clear()

    train_lm(model, train, args.steps, seed=args.seed, log=log)
    if not args.dense:
        report(model, train, val, args.seed)
    save(model, tokenizer, args.out, args.overwrite)
    print(f"saved {args.out} ({time.monotonic() - t0:.1f}s total)")


if __name__ == "__main__":
    main()
