"""Held-out quality of a checkpoint: mean next-token loss and perplexity per dataset, and with a
reference model (e.g. the unpruned source) the mean KL(ref || model) of the next-token
distributions and top-1 agreement, on the very same token windows.

Per window of S tokens, the S-1 next-token predictions count:
loss = -1/N sum log p_model(x_t+1 | x_<=t), ppl = exp(loss),
KL = 1/N sum_t sum_v p_ref(v) (log p_ref(v) - log p_model(v)),
top-1 = 1/N sum_t [argmax p_ref = argmax p_model], and the reference's own loss/ppl on the same
predictions. "overall" weights datasets by tokens.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.data import DataSource, Domain, batches, load_domains
from moekit.ops.modeling import load_model, load_tokenizer
from moekit.runtime.distributed import rank_device, reduce_eval_sums, shard_for_rank

if TYPE_CHECKING:
    import torch


@dataclass
class DomainEval:
    """Numbers of one dataset (or `overall`): `tokens` predicted, loss in nats."""

    name: str
    tokens: int
    loss: float
    ppl: float
    kl: float | None = None
    top1: float | None = None
    ref_loss: float | None = None
    ref_ppl: float | None = None


@dataclass
class EvalResult:
    model: str
    ref: str | None
    domains: list[DomainEval]
    overall: DomainEval
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Sums:
    loss: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0
    ref_loss: float = 0.0

    def result(self, name: str, with_ref: bool) -> DomainEval:
        n = max(self.tokens, 1)
        loss, ref_loss = self.loss / n, self.ref_loss / n
        if not with_ref:
            return DomainEval(name, self.tokens, loss, math.exp(min(loss, 700.0)))
        return DomainEval(name, self.tokens, loss, math.exp(min(loss, 700.0)), self.kl / n,
                          self.agree / n, ref_loss, math.exp(min(ref_loss, 700.0)))


def evaluate(model_path: Path, sources: list[DataSource], ref: Path | None = None, *,
             seq_len: int = 512, max_tokens: int = 32768, batch_size: int = 4,
             device: str = "auto", dtype: str = "auto",
             fraction: tuple[float, float] = (0.0, 1.0), tokenizer: str | None = None,
             text_field: str = "text", keep_both: bool | None = None,
             on_tokens: Callable[[int, int], None] | None = None,
             trust_remote_code: bool = False) -> EvalResult:
    """Evaluate `model_path` on each source (and against `ref` when given).

    `on_tokens(advance, total)` reports progress in input tokens.
    `keep_both`: hold model and reference in memory together (None: when both fit in half of
    the free memory); otherwise the reference runs first and its log-probabilities are spilled
    to a temporary folder (float32, tokens x vocab x 4 bytes) and read back batch by batch.
    Code shipped in a checkpoint runs only with `trust_remote_code`."""
    from moekit.io.remote_code import check_remote_code

    for folder in (model_path, ref, tokenizer):
        if folder is not None:
            check_remote_code(folder, trust_remote_code)
    device = rank_device(device)
    tok = load_tokenizer(Path(ref if ref is not None and tokenizer is None
                              and not _has_tokenizer(model_path) else model_path), tokenizer,
                         trust_remote_code)
    domains = load_domains(sources, tok, seq_len=seq_len, max_tokens=max_tokens,
                           text_field=text_field, fraction=fraction)
    sums = {d.name: _Sums() for d in domains}
    total_tokens = sum(int(batch.numel()) for _, batch in _batches(domains, batch_size))
    if on_tokens is not None:
        on_tokens(0, total_tokens)

    def progress(batch: torch.Tensor) -> None:
        if on_tokens is not None:
            on_tokens(int(batch.numel()), total_tokens)

    if ref is None:
        model = load_model(Path(model_path), device, dtype, trust_remote_code)
        for name, batch in _batches(domains, batch_size):
            _add(sums[name], _logprobs(model, batch), batch, None)
            progress(batch)
    elif keep_both if keep_both is not None else _fits_both(model_path, ref, device, dtype):
        model = load_model(Path(model_path), device, dtype, trust_remote_code)
        reference = load_model(Path(ref), device, dtype, trust_remote_code)
        for name, batch in _batches(domains, batch_size):
            _add(sums[name], _logprobs(model, batch), batch, _logprobs(reference, batch))
            progress(batch)
    else:
        _spilled(model_path, ref, domains, sums, batch_size, device, dtype, progress,
                 trust_remote_code)
    reduce_eval_sums(sums)
    results = [sums[d.name].result(d.name, ref is not None) for d in domains]
    total = _Sums(sum(s.loss for s in sums.values()), sum(s.kl for s in sums.values()),
                  sum(s.agree for s in sums.values()), sum(s.tokens for s in sums.values()),
                  sum(s.ref_loss for s in sums.values()))
    settings = {"seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size,
                "device": device, "dtype": dtype, "data_range": list(fraction),
                "data": {d.name: {"sha256": d.sha256, "files": d.files} for d in domains}}
    return EvalResult(str(model_path), str(ref) if ref is not None else None, results,
                      total.result("overall", ref is not None), settings)


def _spilled(model_path: Path, ref: Path, domains: list[Domain], sums: dict[str, _Sums],
             batch_size: int, device: str, dtype: str,
             progress: Callable[[torch.Tensor], None], trust: bool = False) -> None:
    import gc

    import torch

    with tempfile.TemporaryDirectory(prefix="moekit-eval-") as tmp:
        reference = load_model(Path(ref), device, dtype, trust)
        for i, (_, batch) in enumerate(_batches(domains, batch_size)):
            torch.save(_logprobs(reference, batch).cpu(), Path(tmp) / f"{i}.pt")
        del reference
        gc.collect()
        model = load_model(Path(model_path), device, dtype, trust)
        for i, (name, batch) in enumerate(_batches(domains, batch_size)):
            ref_logp = torch.load(Path(tmp) / f"{i}.pt")
            _add(sums[name], _logprobs(model, batch), batch, ref_logp)
            progress(batch)


def _batches(domains: list[Domain], batch_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's share of the (dataset name, batch) pairs (all of them outside torchrun)."""
    yield from shard_for_rank([(domain.name, batch) for domain in domains
                               for batch in batches(domain, batch_size)])


def _logprobs(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """log p(next token) for positions 0..S-2: [B, S-1, V] float32 on CPU."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=batch.to(model.device), use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def _add(sums: _Sums, logp: torch.Tensor, batch: torch.Tensor,
         ref_logp: torch.Tensor | None) -> None:
    target = batch[:, 1:].unsqueeze(-1)
    sums.loss += float(-logp.gather(-1, target).sum())
    sums.tokens += int(target.numel())
    if ref_logp is not None:
        sums.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        sums.agree += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        sums.ref_loss += float(-ref_logp.gather(-1, target).sum())


def _has_tokenizer(path: Path) -> bool:
    return any((Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                                   "tokenizer.model", "vocab.json"))


def _fits_both(model_path: Path, ref: Path, device: str, dtype: str) -> bool:
    """Both checkpoints (scaled to the load dtype) fit in half the free memory."""
    from moekit.io.reader import Checkpoint

    scale = {"float32": 2.0, "bfloat16": 1.0, "float16": 1.0}.get(dtype, 1.0)
    need = scale * (Checkpoint(Path(model_path)).total_bytes + Checkpoint(Path(ref)).total_bytes)
    return need < 0.5 * _free_memory(device)


def _free_memory(device: str) -> float:
    import torch

    from moekit.ops.modeling import pick_device

    target = pick_device(device)
    if target.type == "cuda":
        return float(torch.cuda.mem_get_info(target)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
