"""`moekit eval --generate PROMPTS`: greedy continuations of a model beside its reference's,
with the first token where they part marked.

Each prompt is tokenized with the model's tokenizer (the reference's must agree, as for
`eval --ref`), then both models continue it greedily (`do_sample=False`, no KV-cache tricks
beyond transformers' own) for `max_new_tokens` tokens, one model in memory at a time (a
quantized checkpoint is decoded on load, as `moekit.runtime` does for every command).
`diverge` is the index of the first generated token that differs (None when identical).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moekit.errors import DataError, InvalidArgumentError, UnsupportedModelError
from moekit.runtime import engine as runtime_engine
from moekit.runtime.loading import load_tokenizer
from moekit.runtime.options import RunOptions

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


@dataclass
class Continuation:
    """One prompt: token ids and text of the model's (and the reference's) continuation."""

    prompt: str
    model_ids: list[int]
    model_text: str
    ref_ids: list[int] | None = None
    ref_text: str | None = None
    diverge: int | None = None
    model_marked: str | None = None
    ref_marked: str | None = None


def read_prompts(source: str, stdin: Any = None) -> list[str]:
    """Prompts, one per non-empty line, from a text file or `-` (standard input)."""
    if source == "-":
        import sys

        text = (stdin or sys.stdin).read()
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"prompt file {source} does not exist",
                            "pass a text file with one prompt per line, or - for stdin")
        text = path.read_text(encoding="utf-8", errors="replace")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{source} holds no prompt", "write one prompt per line")
    return prompts


def generate(model: Path, prompts: list[str], ref: Path | None = None, *,
             max_new_tokens: int = 32, run: RunOptions = RunOptions(),
             tokenizer: str | None = None) -> list[Continuation]:
    """Greedy continuations of `prompts` by `model` (and `ref`), first divergence marked;
    both loaded whole as `run` says (`in_memory`)."""
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"--max-new-tokens {max_new_tokens} is below 1")
    tok = load_tokenizer(model, tokenizer, run.trust_remote_code)
    encoded = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
    ours = _continue(model, encoded, max_new_tokens, run)
    theirs = (_continue(ref, encoded, max_new_tokens, run)
              if ref is not None else [None] * len(prompts))
    out = []
    for prompt, ids, ref_ids in zip(prompts, ours, theirs, strict=True):
        item = Continuation(prompt, ids, tok.decode(ids))
        if ref_ids is not None:
            item.ref_ids, item.ref_text = ref_ids, tok.decode(ref_ids)
            item.diverge = first_difference(ids, ref_ids)
            item.model_marked = marked(ids, item.diverge, tok.decode)
            item.ref_marked = marked(ref_ids, item.diverge, tok.decode)
        out.append(item)
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where `a` and `b` differ (a shorter one differs where it
    ends); None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _continue(path: Path, encoded: list[Any], max_new_tokens: int,
              run: RunOptions) -> list[list[int]]:
    import torch

    loaded = in_memory(path, run, "--generate")
    model = loaded.model
    out = []
    with torch.inference_mode():
        for ids in encoded:
            ids = ids.to(loaded.device)
            new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=_pad(model))
            out.append([int(t) for t in new[0, ids.shape[1]:]])
    del model, loaded
    return out


def in_memory(path: Path, run: RunOptions, option: str) -> Any:
    """The model loaded whole on `run.device` in `run.dtype` (under `--max-memory auto`, whatever
    `run.max_memory` says); one that would be streamed is refused: generation and lm-eval run
    the whole model at once."""
    loaded = runtime_engine.open_model(path, device=run.device, dtype=run.dtype,
                                       trust_remote_code=run.trust_remote_code)
    if loaded.mode != "memory":
        raise UnsupportedModelError(
            f"{option} needs {path} in memory, and it does not fit ({loaded.plan.reason})",
            "run on a machine (or GPU) with more memory; moekit streams only perplexity, "
            "profiles and surgery")
    return loaded


def _pad(model: Any) -> int:
    config = model.generation_config
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def marked(text_ids: list[int], at: int | None, decode: Any) -> str:
    """The continuation's text with the tokens from `at` on between ⟦ ⟧."""
    if at is None:
        return decode(text_ids)
    return decode(text_ids[:at]) + MARK_OPEN + decode(text_ids[at:]) + MARK_CLOSE


def to_markdown(items: list[Continuation], model: str, ref: str | None) -> str:
    """A Markdown report: per prompt the model's continuation and, with a reference, its
    continuation; where they part, the rest of each is between ⟦ ⟧."""
    lines = [f"# Greedy continuations: {model}" + (f" vs {ref}" if ref else ""), ""]
    if ref:
        same = sum(item.diverge is None for item in items)
        lines += [f"{same} of {len(items)} continuations identical to the reference; where "
                  f"they differ, the text from the first differing token on is in "
                  f"{MARK_OPEN} {MARK_CLOSE}.", ""]
    for n, item in enumerate(items, 1):
        text = item.model_marked if item.model_marked is not None else item.model_text
        lines += [f"## {n}. {item.prompt}", "", f"- model: {_escaped(text)}"]
        if item.ref_marked is not None:
            where = "identical" if item.diverge is None else f"differs from token {item.diverge}"
            lines += [f"- reference: {_escaped(item.ref_marked)}", f"- {where}"]
        lines.append("")
    return "\n".join(lines)


def _escaped(text: str) -> str:
    return text.replace("\n", "\\n")


def write_report(items: list[Continuation], path: Path, model: str, ref: str | None) -> None:
    """`.md` (to_markdown) or `.json` (every field, ids included)."""
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"model": model, "ref": ref,
                                    "continuations": [asdict(i) for i in items]}, indent=2))
    else:
        path.write_text(to_markdown(items, model, ref), encoding="utf-8")
