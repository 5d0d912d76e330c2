"""`moekit eval --generate`: run the library's greedy continuations and show them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moekit.cli.common import console, err_console
from moekit.cli.heading import headed

if TYPE_CHECKING:
    from moekit.runtime.options import RunOptions


def run_generate(path: Path, ref: Path | None, prompts: str, out: Path | None, *,
                 max_new_tokens: int, run: RunOptions, tokenizer: str | None) -> None:
    """Generate, print a table (model vs reference, divergence marked), write `out`."""
    from rich import box
    from rich.table import Table

    from moekit.ops.generate import generate, read_prompts, write_report

    items = generate(path, read_prompts(prompts), ref, max_new_tokens=max_new_tokens, run=run,
                     tokenizer=tokenizer)
    table = Table(title=f"greedy continuations: {path}" + (f" vs {ref}" if ref else ""),
                  title_justify="left", box=box.SIMPLE_HEAD, show_lines=True,
                  caption="⟦ ⟧: from the first token that differs" if ref else None,
                  caption_justify="left")
    for name in ["prompt", "model"] + (["reference", "first diff"] if ref else []):
        table.add_column(name, overflow="fold")
    for item in items:
        row = [item.prompt, item.model_marked or item.model_text]
        if ref:
            row += [item.ref_marked or "", "-" if item.diverge is None else str(item.diverge)]
        table.add_row(*row)
    console.print(headed(table))
    if ref:
        same = sum(item.diverge is None for item in items)
        err_console.print(f"{same} of {len(items)} continuations identical to the reference")
    if out is not None:
        write_report(items, out, str(path), str(ref) if ref else None)
        err_console.print(f"continuations written to {out}")
