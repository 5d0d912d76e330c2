"""Benchmark `moekit upcycle` against `mergekit-moe` on the same job.

Job: a random dense Llama (bf16, hidden 1024, intermediate 2816, 28 layers, vocab 32000,
about 0.43 B parameters) -> Mixtral with 8 copied experts, top-2, random router.

Method: both tools run as child processes; wall time with time.perf_counter, peak RSS from
os.wait4's rusage of that child. Before every run the input files are evicted from the page
cache (posix_fadvise DONTNEED) and the previous output is deleted (and synced). One warm-up
run of each tool, then --runs timed runs interleaved (moekit, mergekit, moekit, ...).
mergekit is installed from PyPI into its own venv (cached under ~/.cache/moekit-bench).

Run:  .venv/bin/python benchmarks/bench_upcycle.py [--runs 3] [--layers 28] [--skip-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 1024, 2816, 32000, 16
EXPERTS, TOP_K = 8, 2
VENV = Path.home() / ".cache" / "moekit-bench" / "mergekit-venv"


def build_dense(folder: Path, layers: int) -> int:
    """Write a random bf16 Llama checkpoint (safetensors + config + tokenizer); returns
    the parameter count. Tensors are created one at a time to bound memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, vocab_size=VOCAB, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
        for proj in "qkvo":
            shapes[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
               if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
               for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer().save_pretrained(folder)
    return sum(t.numel() for t in tensors.values())


def _tokenizer():  # noqa: ANN202 - a small offline byte-level BPE (mergekit copies it)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line for line in (json.__doc__ or "").splitlines() if line.strip()] * 4
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def ensure_mergekit(venv: Path) -> Path:
    """The mergekit-moe executable, installing mergekit into `venv` on first use."""
    exe = venv / "bin" / "mergekit-moe"
    if not exe.exists():
        print(f"installing mergekit into {venv} ...", flush=True)
        python = shutil.which("python3") or sys.executable
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    return exe


def evict(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (they are clean, so this is honoured)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process. Peak RSS comes from GNU time
    (`%M`, measured by a tiny parent, so nothing of this process is counted) when available,
    else from os.wait4's rusage."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        prefix = [str(gnu_time), "-f", "%M", "-o", report.name] if gnu_time.exists() else []
        start = time.perf_counter()
        proc = subprocess.Popen(prefix + command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        error = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if code != 0:
            raise RuntimeError(f"{command[0]} failed ({code}): {error[-2000:]}")
        kib = int(report.read().split()[-1]) if prefix else usage.ru_maxrss
    return wall, kib * 1024 / 1e9


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def one_run(name: str, command: list[str], dense: Path, out: Path, env: dict[str, str]
            ) -> tuple[float, float, int]:
    if out.exists():
        shutil.rmtree(out)
    os.sync()
    evict(dense)
    wall, rss = measure(command, env)
    size = folder_bytes(out)
    shutil.rmtree(out)
    os.sync()
    print(f"  {name:9s} wall {wall:6.2f} s  peak RSS {rss:5.2f} GB  output {size / 1e9:.2f} GB",
          flush=True)
    return wall, rss, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(build_dense(args.build, args.layers))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-upcycle-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    need = 9e9 if args.skip_mergekit else 11e9  # dense 0.9 + output 4.3 (x2 in flight) + slack
    if free < need:
        sys.exit(f"only {free / 1e9:.1f} GB free under {work}; need about {need / 1e9:.0f} GB")
    try:
        dense = work / "dense"
        # In a child, so this process stays small (a forked child starts with its RSS).
        built = subprocess.run([sys.executable, __file__, "--build", str(dense),
                                "--layers", str(args.layers)], check=True,
                               capture_output=True, text=True)
        params = int(built.stdout.split()[-1])
        os.sync()
        print(f"dense Llama: {params / 1e9:.3f} B params, "
              f"{folder_bytes(dense) / 1e9:.2f} GB in {dense}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        moekit = shutil.which("moekit", path=str(Path(sys.executable).parent)) or "moekit"
        jobs = {"moekit": [moekit, "upcycle", str(dense), "--arch", "mixtral", "--experts",
                           str(EXPERTS), "--top-k", str(TOP_K), "--method", "copy", "--router",
                           "random", "--out", str(work / "out-moekit")]}
        if not args.skip_mergekit:
            config = work / "mergekit.yml"
            experts = "".join(f"  - source_model: {dense}\n" for _ in range(EXPERTS))
            config.write_text(f"base_model: {dense}\ngate_mode: random\ndtype: bfloat16\n"
                              f"experts_per_token: {TOP_K}\nexperts:\n{experts}")
            jobs["mergekit"] = [str(ensure_mergekit(args.venv)), str(config),
                                str(work / "out-mergekit")]
        for name, command in jobs.items():
            print(f"{name}: {' '.join(command)}")
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in jobs}
        print("warm-up")
        for name, command in jobs.items():
            one_run(name, command, dense, work / f"out-{name}", env)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}")
            for name, command in jobs.items():
                results[name].append(one_run(name, command, dense, work / f"out-{name}", env))
        summarize(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(results: dict[str, list[tuple[float, float, int]]]) -> None:
    summary = {name: {"wall_s_median": statistics.median(r[0] for r in runs),
                      "wall_s_runs": [round(r[0], 2) for r in runs],
                      "peak_rss_gb_max": max(r[1] for r in runs),
                      "output_gb": runs[0][2] / 1e9} for name, runs in results.items()}
    print("\nmedian wall / max peak RSS")
    for name, row in summary.items():
        print(f"  {name:9s} {row['wall_s_median']:6.2f} s  {row['peak_rss_gb_max']:5.2f} GB  "
              f"(runs {row['wall_s_runs']}, output {row['output_gb']:.2f} GB)")
    if "mergekit" in summary:
        ours, theirs = summary["moekit"], summary["mergekit"]
        wall = ours["wall_s_median"] / theirs["wall_s_median"]
        rss = ours["peak_rss_gb_max"] / theirs["peak_rss_gb_max"]
        print(f"  ratio moekit/mergekit: wall {wall:.2f} (target <= 0.33), "
              f"peak RSS {rss:.2f}; moekit peak RSS target < 1 GB")
        summary["ratios"] = {"wall": wall, "peak_rss": rss}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
