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
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moekit.calib.data
import moekit.runtime.engine
from moekit.calib.data import batches
from moekit.calib.spec import DataSpec, per_source
from moekit.errors import InvalidArgumentError
from moekit.io.reader import Checkpoint, load_config
from moekit.io.remote_code import check_remote_code
from moekit.ops.heldout import calibration_overlap
from moekit.runtime.budget import PAIR_FRACTION, free_memory, header_sizes
from moekit.runtime.distributed import rank_device, reduce_eval_sums, shard_for_rank
from moekit.runtime.hidden import no_room
from moekit.runtime.loading import held_itemsize, load_tokenizer, pick_device
from moekit.runtime.options import RunOptions

if TYPE_CHECKING:
    import torch

EVAL_TOKENS = 32768  # the default --max-tokens, in total over the sources


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


def evaluate(model_path: Path, data: DataSpec, ref: Path | None = None, *,
             run: RunOptions = RunOptions(), batch_size: int = 4, keep_both: bool | None = None,
             on_tokens: Callable[[int, int], None] | None = None,
             **engine: Any) -> EvalResult:
    """Evaluate `model_path` on each source of `data` (`calib.spec.DataSpec`; no sources:
    sample_data/), and against `ref` when given, on at most `data.max_tokens` tokens in total
    (None: EVAL_TOKENS), an equal share from each source; `data.tokenizer` replaces the
    models' own.

    `on_tokens(advance, total)` reports progress in input tokens. Models run as `run` says
    (`runtime.options.RunOptions`) through `moekit.runtime` (in memory or streamed under
    `run.max_memory`; `engine`: further `open_model` options).
    `keep_both`: hold model and reference in memory together (None: when both fit in
    `runtime.budget.PAIR_FRACTION` of the free memory); otherwise the reference runs first and its
    log-probabilities are spilled to a temporary folder (float32, tokens x vocab x 4 bytes) and read
    back batch by batch.
    Code shipped in a checkpoint runs only with `run.trust_remote_code`."""
    tokenizer, trust_remote_code = data.tokenizer, run.trust_remote_code
    for folder in (model_path, ref, tokenizer):
        if folder is not None:
            check_remote_code(folder, trust_remote_code)
    device = rank_device(run.device)  # this rank's device under torchrun
    tok = load_tokenizer(Path(ref if ref is not None and tokenizer is None
                              and not _has_tokenizer(model_path) else model_path), tokenizer,
                         trust_remote_code)
    if ref is not None:
        check_same_vocabulary(Path(model_path), Path(ref), tok, tokenizer, trust_remote_code)
    sources, max_tokens = data.resolved_sources(), data.total(EVAL_TOKENS)
    domains = moekit.calib.data.load_domains(sources, tok, seq_len=data.seq_len,
                                             max_tokens=per_source(max_tokens, len(sources)),
                                             text_field=data.text_field, fraction=data.fraction)
    # this rank's share of the (dataset, batch) pairs (all of them outside torchrun)
    work = shard_for_rank([(d.name, batch) for d in domains for batch in batches(d, batch_size)])
    sums = {d.name: _Sums() for d in domains}
    total_tokens = sum(int(batch.numel()) for _, batch in work)
    if on_tokens is not None:
        on_tokens(0, total_tokens)
    options = {**replace(run, device=device).engine(), **engine}
    runtime = _run(model_path, ref, work, sums, options, keep_both, on_tokens, total_tokens)
    reduce_eval_sums(sums)
    results = [sums[d.name].result(d.name, ref is not None) for d in domains]
    total = _Sums(sum(s.loss for s in sums.values()), sum(s.kl for s in sums.values()),
                  sum(s.agree for s in sums.values()), sum(s.tokens for s in sums.values()),
                  sum(s.ref_loss for s in sums.values()))
    settings = {"seq_len": data.seq_len, "max_tokens": max_tokens, "batch_size": batch_size,
                "device": device, "dtype": run.dtype, "data_range": list(data.fraction),
                "data": {d.name: {"sha256": d.sha256, "files": d.files} for d in domains},
                "runtime": runtime,
                "warnings": calibration_overlap(Path(model_path), domains, data.fraction)}
    return EvalResult(str(model_path), str(ref) if ref is not None else None, results,
                      total.result("overall", ref is not None), settings)


def _run(model_path: Path, ref: Path | None, work: list[tuple[str, torch.Tensor]],
         sums: dict[str, _Sums], options: dict[str, Any], keep_both: bool | None,
         on_tokens: Callable[[int, int], None] | None, total: int) -> dict[str, Any]:
    """Run the model (and reference) over `work`, adding to `sums`; returns what ran how."""
    ids = [batch for _, batch in work]

    def progress(i: int, fraction: float) -> None:
        if on_tokens is not None:
            on_tokens(int(ids[i].numel() * fraction), total)

    if ref is None:
        model = moekit.runtime.engine.open_model(Path(model_path), **options)
        for i, logits in model.run(ids, head=True, progress=progress):
            _add(sums[work[i][0]], _logprobs(logits), ids[i], None)
        return {"model": model.describe()}
    if keep_both if keep_both is not None else _fits_both(model_path, ref, options):
        model = moekit.runtime.engine.open_model(Path(model_path), **options)
        reference = moekit.runtime.engine.open_model(Path(ref), **options)
        for (i, logits), (_, ref_logits) in zip(model.run(ids, head=True, progress=progress),
                                                reference.run(ids, head=True), strict=True):
            _add(sums[work[i][0]], _logprobs(logits), ids[i], _logprobs(ref_logits))
        return {"model": model.describe(), "ref": reference.describe()}
    return _spilled(model_path, ref, work, sums, options, progress)


def _spilled(model_path: Path, ref: Path, work: list[tuple[str, torch.Tensor]],
             sums: dict[str, _Sums], options: dict[str, Any],
             progress: Callable[[int, float], None]) -> dict[str, Any]:
    import gc

    import torch

    ids = [batch for _, batch in work]
    with tempfile.TemporaryDirectory(prefix="moekit-eval-") as tmp:
        reference = moekit.runtime.engine.open_model(Path(ref), **options)
        shapes = {i: _save_logprobs(Path(tmp), i, _logprobs(logits), ids)
                  for i, logits in reference.run(ids, head=True)}
        described = reference.describe()
        del reference
        gc.collect()
        model = moekit.runtime.engine.open_model(Path(model_path), **options)
        for i, logits in model.run(ids, head=True, progress=progress):
            ref_logp = torch.from_file(str(Path(tmp) / f"{i}.f32"), size=math.prod(shapes[i]),
                                       dtype=torch.float32).view(shapes[i])
            _add(sums[work[i][0]], _logprobs(logits), ids[i], ref_logp)
    return {"model": model.describe(), "ref": described}


def _save_logprobs(folder: Path, index: int, logp: torch.Tensor,
                   ids: list[torch.Tensor]) -> tuple[int, ...]:
    """Write batch `index`'s reference log-probabilities as raw float32; a full disk ends in
    one SpillError naming the folder and the space all batches need."""
    try:
        with open(folder / f"{index}.f32", "wb") as handle:
            handle.write(memoryview(logp.contiguous().numpy()).cast("B"))
    except OSError as err:
        predicted = sum(b.shape[0] * (b.shape[1] - 1) for b in ids)
        raise no_room("the reference's log-probabilities", folder, err,
                      predicted * logp.shape[-1] * 4) from err
    return tuple(logp.shape)


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log p(next token) for positions 0..S-2: [B, S-1, V] float32 on CPU."""
    import torch

    with torch.inference_mode():
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


def _fits_both(model_path: Path, ref: Path, options: dict[str, Any]) -> bool:
    """Both checkpoints (scaled to the load dtype) fit in PAIR_FRACTION of the free memory
    (`runtime.budget`)."""
    device = pick_device(options.get("device", "auto"))
    checkpoints = [Checkpoint(Path(path)) for path in (model_path, ref)]
    need = sum(header_sizes(c, held_itemsize(c, options.get("dtype", "auto"), device)).total
               for c in checkpoints)
    return need < PAIR_FRACTION * free_memory(device)


def check_same_vocabulary(model_path: Path, ref: Path, tok: Any, tokenizer: str | None,
                          trust_remote_code: bool) -> None:
    """KL and top-1 compare the two models' next-token distributions id by id, so refuse
    (before any forward) a reference whose vocabulary size differs, or whose own tokenizer
    gives any token another id than `tok` (the one both models are fed with)."""
    sizes = (_vocab_size(model_path), _vocab_size(ref))
    fix = "compare against a model with the same tokenizer, e.g. the one it was made from"
    if None not in sizes and sizes[0] != sizes[1]:
        raise InvalidArgumentError(f"--ref {ref} has a vocabulary of {sizes[1]} tokens but "
                                   f"{model_path} has {sizes[0]}: KL and top-1 need the same "
                                   "token ids", fix)
    if tokenizer is not None or not (_has_tokenizer(model_path) and _has_tokenizer(ref)):
        return  # both models read the same tokenizer
    ours, theirs = tok.get_vocab(), load_tokenizer(ref, None, trust_remote_code).get_vocab()
    if ours != theirs:
        token = next(t for t in sorted(set(ours) | set(theirs)) if ours.get(t) != theirs.get(t))
        raise InvalidArgumentError(f"--ref {ref} has another tokenizer than {model_path}: token "
                                   f"{token!r} is id {theirs.get(token)} there and "
                                   f"{ours.get(token)} here", fix)


def _vocab_size(folder: Path) -> int | None:
    """`vocab_size` of config.json (or of its `text_config`), or None when it has none."""
    config = load_config(folder)
    value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return value if isinstance(value, int) else None
