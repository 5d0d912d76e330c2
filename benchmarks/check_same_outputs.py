"""Are the outputs of every command unchanged between two commits? (issue 21: the moves must
not change a byte.)

Checks out `--before` into a temporary worktree, runs the same moekit commands with each
tree's code on the same inputs (the shared fixture model and texts, one data source so that
every meaning `--max-tokens` has had agrees), and compares what they wrote: safetensors and
npz tensors (names, dtypes, shapes, bytes), tables (CSV/Parquet, byte for byte), JSON files
and printed JSON without run-specific fields (time, command, version, paths, free RAM).
Fields or tensors that only the newer tree writes, and values where the older one wrote
null, are counted apart ("new"); a changed or missing value is a difference. Prints one
line per file and exits 1 on a difference.

    .venv/bin/python benchmarks/check_same_outputs.py --before 270f831 \
        --fixtures ../shared/fixtures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = {"created", "command", "moekit_version", "elapsed_s", "seconds", "wall_s",
              "started", "finished", "source", "model", "folder", "path", "out", "stats",
              "tokens_per_s", "timing", "peak_rss_bytes"}


def commands(model: Path, dense: Path, texts: Path, out: Path) -> dict[str, list[str]]:
    """name -> moekit arguments. Every command that writes a model or a table, on small budgets."""
    data = ["--data", f"texts={texts}", "--seq-len", "128"]
    prof = out / "profile"
    return {
        "inspect": ["inspect", str(model), "--json"],
        "profile": ["profile", str(model), *data, "--data-range", "0:0.5", "--max-tokens",
                    "4096", "--device", "cpu", "--out", str(prof)],
        "prune-stats": ["prune", str(model), "--stats", str(prof), "--ratio", "0.5",
                        "--out", str(out / "pruned")],
        "prune-data": ["prune", str(model), *data, "--data-range", "0:0.5", "--ratio", "0.5",
                       "--beam", "2", "--compensate",
                       "--reconstruct-steps", "20", "--refit-tokens", "4096", "--device", "cpu",
                       "--out", str(out / "pruned-data")],
        "merge-average": ["merge", str(model), "--stats", str(prof), "--ratio", "0.5",
                          "--method", "average", "--out", str(out / "merged")],
        "upcycle": ["upcycle", str(dense), "--experts", "4", "--top-k", "2",
                    "--out", str(out / "upcycled")],
        "eval": ["eval", str(out / "pruned"), *data, "--data-range", "0.5:1",
                 "--max-tokens", "2048", "--device", "cpu", "--json"],
    }


def run_all(tree: Path, model: Path, dense: Path, texts: Path, out: Path,
            replace: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
    """Run every command with the code of `tree`; stdout of each by name. `replace`:
    {(command name, argument): new argument} for an option whose meaning changed on purpose."""
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    printed = {}
    for name, args in commands(model, dense, texts, out).items():
        args = [b for a in args for b in (replace or {}).get((name, a), a).split(" ")]
        done = subprocess.run([sys.executable, "-m", "moekit", *args], env=env, cwd=tree,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed in {tree}: {done.stderr.strip()[-800:]}")
        printed[name] = done.stdout
    return printed


def tensors(path: Path) -> dict[str, str]:
    """Name -> digest of dtype, shape and bytes, for a safetensors or npz file."""
    import numpy as np

    if path.suffix == ".npz":
        arrays = dict(np.load(path))
    else:
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
        except TypeError:  # bfloat16 has no numpy dtype: compare the raw bytes
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                arrays = {k: f.get_tensor(k).view(-1).view(__import__("torch").uint8).numpy()
                          for k in f.keys()}
    return {k: hashlib.sha256(f"{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v)
                              .tobytes()).hexdigest() for k, v in arrays.items()}


def content(path: Path) -> object:
    """What is compared of one output file: tensors by name, JSON without the run fields,
    other files' bytes; rendered files (PNG, HTML, Markdown with dates) are not compared."""
    if path.suffix in (".safetensors", ".npz"):
        return tensors(path)
    if path.suffix in (".json", ".stdout"):
        text = path.read_text()
        return strip(json.loads(text)) if text.lstrip()[:1] in ("{", "[") else None
    if path.suffix in (".png", ".html", ".md"):
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def strip(value):  # noqa: ANN001, ANN201 - JSON in, JSON out
    """JSON without the fields that differ run to run (or with the tree's paths)."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in RUN_FIELDS}
    if isinstance(value, list):
        return [strip(v) for v in value]
    if isinstance(value, str) and ("/" in value or "free RAM" in value):
        return "<path or machine state>"
    return value


def compare(a: object, b: object) -> tuple[int, int]:
    """(values changed, fields or tensors added) going from `a` to `b`."""
    if isinstance(a, dict) and isinstance(b, dict):
        changed = sum(compare(a[k], b[k])[0] for k in a if k in b) + sum(k not in b for k in a)
        added = sum(k not in a for k in b) + sum(compare(a[k], b[k])[1] for k in a if k in b)
        return changed, added
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found = [compare(x, y) for x, y in zip(a, b, strict=True)]
        return sum(f[0] for f in found), sum(f[1] for f in found)
    if a is None and b is not None:
        return 0, 1  # a value recorded where the older tree wrote null
    return int(a != b), 0


def files(folder: Path) -> dict[str, object]:
    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit to compare against")
    parser.add_argument("--after", default=str(ROOT), help="tree to test (default: this one)")
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    parser.add_argument("--keep", type=Path, help="copy both runs' outputs here to look at")
    parser.add_argument("--replace", action="append", default=[], metavar="NAME:OLD=NEW",
                        help="in the newer tree's command NAME, argument OLD becomes NEW (one "
                        "or more, space-separated: an option whose meaning or default changed "
                        "on purpose), e.g. 'prune-data:--compensate=--compensate --effort best'")
    args = parser.parse_args()
    model = args.fixtures / "models" / "mixtral-e16k2"
    dense = args.fixtures / "models" / "qwen3-dense"
    texts = args.fixtures / "text"
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.before], check=True, capture_output=True)
        try:
            outs = {}
            replace = {(r.split(":", 1)[0], r.split(":", 1)[1].split("=", 1)[0]):
                       r.split("=", 1)[1] for r in args.replace}
            for name, tree in (("before", before), ("after", Path(args.after))):
                printed = run_all(tree, model, dense, texts, Path(tmp) / f"out-{name}",
                                  replace if name == "after" else None)
                for cmd, text in printed.items():
                    (Path(tmp) / f"out-{name}" / f"{cmd}.stdout").write_text(text)
                outs[name] = (printed, files(Path(tmp) / f"out-{name}"))
            if args.keep:
                shutil.copytree(tmp, args.keep, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("before"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False)
    differ = 0
    fa, fb = outs["before"][1], outs["after"][1]
    for rel in sorted(set(fa) | set(fb)):
        if rel not in fa or rel not in fb:
            state = "only before" if rel not in fb else "only after (new file)"
            differ += rel not in fb
        elif fa[rel] is None:
            state = "not compared (rendered)"
        else:
            changed, added = compare(fa[rel], fb[rel])
            state = (f"DIFFERENT ({changed} values)" if changed else
                     f"same (+{added} new fields, tensors or values)" if added else "same")
            differ += bool(changed)
        print(f"{rel:45s} {state}")
    print(f"{differ} difference(s)")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
