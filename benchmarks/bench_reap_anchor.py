#!/usr/bin/env python3
"""The anchor beside `prune --data --effort fast`: llm-compressor's `REAPPruningModifier`.

llm-compressor pins its own transformers, so it runs in a separate virtual environment
(`--llmc-python`, e.g. /work/venv-llmc/bin/python, made with `pip install torch==2.13.0`
first, then `pip install llmcompressor`). This script, run with moekit's interpreter:

1. tokenises the calibration windows exactly as `prune --data` does (moekit's tokeniser
   path, `--data-range 0:0.5`, windows of `--seq-len`, the first `--tokens` positions
   interleaved over the five fixture texts) and saves them as a list of token-id lists;
2. runs itself in the llm-compressor environment (`--child`): `oneshot(model, dataset=those
   windows, recipe=REAPPruningModifier(sparsity=R))`, on the CPU, then `save_pretrained`; the
   child prints its own wall and CPU seconds (model loading excluded, `oneshot` to saved folder
   included) and the resident peak;
3. (Mixtral) renames the saved expert tensors to the Hub's names (`hub_names`), then
   evaluates the output with `moekit eval` on `--data-range 0.5:1` (the same command as
   `bench_effort.py`) and prints one JSON row per ratio.

    .venv/bin/python benchmarks/bench_reap_anchor.py --llmc-python /work/venv-llmc/bin/python \
        --ratios 0.25 0.5 --tokens 16384

The child imports only torch, transformers and llmcompressor (no moekit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DOMAINS = ("code_py", "de", "en_bible", "en_docs", "fr")


def windows(model: Path, text: Path, tokens: int, seq_len: int) -> list[list[int]]:
    """The first `tokens` positions of the five first halves, `seq_len` windows, round-robin
    over the domains (as `layerfit.measured.load_calibration` interleaves them)."""
    from moekit.calib.data import DataSource, load_domains
    from moekit.runtime.loading import load_tokenizer

    tok = load_tokenizer(model, None)
    sources = [DataSource(d, text / f"{d}.txt") for d in DOMAINS]
    per = -(-tokens // len(DOMAINS)) + seq_len
    found = load_domains(sources, tok, seq_len=seq_len, max_tokens=per, fraction=(0.0, 0.5))
    out, seen = [], 0
    for i in range(max(len(d.windows) for d in found)):
        for d in found:
            if i < len(d.windows) and seen < tokens:
                out.append([int(x) for x in d.windows[i]])
                seen += len(out[-1])
    return out


def child(args: argparse.Namespace) -> None:
    """In the llm-compressor environment: REAP at `args.ratio`, saved to `args.out`."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ids = json.loads(Path(args.windows).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(w) for w in ids]})
    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tok, dataset=data, num_calibration_samples=len(ids),
            max_seq_length=args.seq_len, shuffle_calibration_samples=False,
            recipe=REAPPruningModifier(sparsity=args.ratio, report_path=str(
                Path(args.out).parent / "reap_report.json")),
            moe_calibrate_all_experts=args.all_experts)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "peak_rss": peak}), flush=True)


RENAME = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}


def hub_names(folder: Path) -> int:
    """llm-compressor saves Mixtral's experts as it linearised them (`experts.N.gate_proj`,
    `up_proj`, `down_proj`), which transformers' Mixtral loader does not read (it expects the
    Hub's `w1`, `w3`, `w2`: loaded as is, those experts stay randomly initialised); rename
    them in place. Returns the tensors renamed."""
    from safetensors.torch import load_file, save_file

    renamed = 0
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        out = {}
        for name, tensor in tensors.items():
            new = name
            if ".experts." in name:
                for old, hub in RENAME.items():
                    new = new.replace(old, hub)
            renamed += new != name
            out[new] = tensor
        save_file(out, path, metadata={"format": "pt"})
    return renamed


def evaluate(model: Path, args: argparse.Namespace) -> float:
    code = "import sys; from moekit.cli.app import main; sys.argv = sys.argv[1:]; main()"
    data = [x for d in DOMAINS for x in ("--data", f"{d}={args.text / f'{d}.txt'}")]
    out = subprocess.run([sys.executable, "-c", code, "moekit", "eval", str(model), *data,
                          "--data-range", "0.5:1", "--seq-len", str(args.seq_len),
                          "--max-tokens", str(args.eval_tokens), "--json"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return float(json.loads(out.stdout)["overall"]["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "models" / "mixtral-e16k2")
    parser.add_argument("--text", type=Path, default=FIXTURES / "text")
    parser.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--all-experts", action=argparse.BooleanOptionalAction, default=True,
                        help="llm-compressor's moe_calibrate_all_experts (its default: on)")
    parser.add_argument("--keep", type=Path, help="keep the pruned folders under this folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    base = evaluate(args.model, args)
    print(f"unpruned loss {base:.4f} (load average {os.getloadavg()[0]:.2f})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        found = windows(args.model, args.text, args.tokens, args.seq_len)
        path = Path(tmp) / "windows.json"
        path.write_text(json.dumps(found))
        for ratio in args.ratios:
            out = (args.keep or Path(tmp)) / f"reap-{ratio}"
            cmd = [args.llmc_python, __file__, "--child", "--model", str(args.model),
                   "--windows", str(path), "--ratio", str(ratio), "--out", str(out),
                   "--seq-len", str(args.seq_len),
                   "--all-experts" if args.all_experts else "--no-all-experts"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"REAP {ratio}: failed ({proc.returncode})\n{proc.stderr[-4000:]}")
                continue
            row = json.loads(line[7:])
            row.update(ratio=ratio, positions=sum(len(w) for w in found),
                       kept=json.loads((out.parent / "reap_report.json").read_text()),
                       renamed=hub_names(out) if "mixtral" in str(args.model) else 0)
            row["loss"] = evaluate(out, args)
            row["increase"] = row["loss"] - base
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
