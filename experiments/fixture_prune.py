"""Shared by the layer-level prune experiments (`bench_absorb.py`, `bench_postrefit.py`): run
`moekit prune --data <the five fixture texts>` in this process (so that wrapped library
functions see every layer) and print the rows the wrappers collected as a Markdown table."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DOMAINS = ("code_py", "de", "en_bible", "en_docs", "fr")


def fixture_arguments(description: str, seq_len: int) -> argparse.ArgumentParser:
    """--model, --text, --tokens, --ratio, --start, --seq-len with the fixture's defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=FIXTURES / "models" / "mixtral-e16k2")
    parser.add_argument("--text", type=Path, default=FIXTURES / "text")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    return parser


def run_prune(args: argparse.Namespace) -> None:
    """One calibrated prune of `args.model` on START:0.5 of each text, into a temporary folder."""
    from moekit.cli.app import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["moekit", "prune", str(args.model), "--data-range", f"{args.start}:0.5",
                    "--ratio", str(args.ratio), "--seq-len", str(args.seq_len),
                    "--max-tokens", str(args.tokens), "--out", str(Path(tmp) / "out")]
        for d in DOMAINS:
            sys.argv += ["--data", f"{d}={args.text / f'{d}.txt'}"]
        try:
            cli()
        except SystemExit as exc:
            if exc.code:
                raise


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
