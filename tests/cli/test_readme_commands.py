"""The README's commands as a new user meets them (issue 24 item 2): every `moekit` line of the
shell blocks of README.md and docs/*.md parses against the real CLI (commands, options, value
types), every repository path they name exists, the set-up says how to reach the installed CLI
before the first bare `moekit`, and in a fresh `git clone` of this repository (its committed
tree) the reduced demo and the README's "Using it" block run as written, on tiny stand-ins
for their inputs.

Only the set-up itself (`scripts/env.sh`: a virtual environment and `pip install`, network) is
replaced: by a `.venv` whose `moekit` and `python` run this interpreter on the clone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
OPTIONAL = re.compile(r"\[[^\]]*\]")  # `[--seq-len 512]` in a synopsis line
PATH_PREFIXES = ("scripts/", "sample_data/", "docs/", "benchmarks/", "experiments/", "tests/")
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def shell_lines(text: str) -> Iterator[str]:
    """The logical lines (continuations joined) of the fenced shell blocks of `text`."""
    for block in BLOCK.finditer(text):
        for line in block.group(1).replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                yield line


def moekit_args(line: str) -> list[str] | None:
    """The arguments of the moekit command a shell line runs (`moekit ...`, `.venv/bin/moekit
    ...`, `... -m moekit ...` as under torchrun), or None."""
    tokens = shlex.split(OPTIONAL.sub(" ", line), comments=True)
    for i, token in enumerate(tokens):
        if token in ("moekit", ".venv/bin/moekit") and all("=" in t for t in tokens[:i]):
            return tokens[i + 1:]
        if token == "-m" and tokens[i + 1:i + 2] == ["moekit"]:
            return tokens[i + 2:]
    return None


def parse(args: list[str], loose: bool = False) -> None:
    """Parse `args` as `moekit ARGS` would, without running anything: an unknown command or
    option, a value of the wrong type or (unless `loose`) a missing argument raises."""
    import typer

    from moekit.cli.app import app

    command, name = typer.main.get_command(app), "moekit"
    while hasattr(command, "commands"):
        while args and args[0].startswith("-"):  # the group's own flags (--debug)
            args = args[1:]
        if not args or args[0] not in command.commands:
            raise ValueError(f"no such command: {name} {args[:1]}")
        name, command, args = args[0], command.commands[args[0]], args[1:]
    command.make_context(name, list(args), resilient_parsing=loose)


def _documented() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}: {line[:60]}", line) for path in DOCS
            for line in shell_lines(path.read_text()) if moekit_args(line) is not None]


@pytest.mark.parametrize("where, line", _documented(), ids=[w for w, _ in _documented()])
def test_every_documented_moekit_line_parses(where, line):
    args = moekit_args(line)
    loose = "..." in args or OPTIONAL.search(line) is not None  # a synopsis, not a command
    parse([a for a in args if a != "..."], loose=loose)


@pytest.mark.parametrize("args", [["prune", "m", "--bogus"], ["nosuch"], ["stats", "nosuch"],
                                  ["prune"], ["profile", "m", "--max-tokens", "many"]])
def test_the_parse_check_can_fail(args):
    with pytest.raises(Exception):  # noqa: B017 - click's usage errors, whichever
        parse(args)


def test_every_path_the_docs_name_exists():
    """Repository paths in shell blocks and backticks, and relative Markdown links."""
    missing = []
    for path in DOCS:
        text = path.read_text()
        words = [w for line in shell_lines(text) for w in shlex.split(line, comments=True)]
        words += re.findall(r"`([^`\s]+)`", text)
        for word in words:
            word = word.split("=", 1)[-1].split("::", 1)[0].rstrip(".,;:)")
            if word.startswith(PATH_PREFIXES) and not any(c in word for c in "*{<$"):
                if not (ROOT / word).exists():
                    missing.append(f"{path.name}: {word}")
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link and not (path.parent / link).exists():
                missing.append(f"{path.name}: link {link}")
    assert not missing, missing


def test_setup_reaches_the_cli_before_the_first_bare_moekit():
    readme = (ROOT / "README.md").read_text()
    first = min(readme.index(line[:30]) for line in shell_lines(readme)
                if line.split()[0] == "moekit")
    assert "source .venv/bin/activate" in readme[:first], "say how to reach .venv/bin/moekit"
    for line in shell_lines(readme):
        word = line.split()[0]
        assert word not in ("python", "python3", "pip"), f"{line}: use .venv/bin/{word}"
    for script in ("demo.sh", "test.sh"):
        assert f"bash scripts/{script}" in readme
        assert "bash scripts/env.sh" in (ROOT / "scripts" / script).read_text()
    env = (ROOT / "scripts" / "env.sh").read_text()
    assert "-m venv" in env and ".venv/bin/pip install" in env and '-e ".[dev]"' in env
    assert 'moekit = "moekit.cli.app:main"' in (ROOT / "pyproject.toml").read_text()
    assert "DEMO_STEPS" in (ROOT / "scripts" / "demo.sh").read_text()


# ---- run as written, from a fresh clone ------------------------------------------------------

@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A `git clone` of this repository with a stand-in for the `.venv` scripts/env.sh makes."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    folder = tmp_path_factory.mktemp("fresh") / "moekit"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True, timeout=120)
    venv = folder / ".venv" / "bin"
    venv.mkdir(parents=True)
    python = f'"{sys.executable}"'
    for name, run in (("moekit", f"{python} -m moekit"), ("python", python)):
        (venv / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (venv / name).chmod(0o755)
    (venv / "activate").write_text(f'export PATH="{venv}:$PATH"\n')
    (folder / ".venv" / ".moekit-installed").touch()  # env.sh: installed, newer than pyproject
    return folder


def run_in(folder: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    full.update(PYTHONPATH=str(folder), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", **env)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=full,
                          capture_output=True, text=True, timeout=900)


def test_reduced_demo_runs_from_a_fresh_clone(clone):
    """`bash scripts/demo.sh` as the README says, with 20 training steps instead of 600."""
    result = run_in(clone, "bash scripts/demo.sh", DEMO_STEPS="20")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = clone / "demo_out"
    for name in ("profile/report.md", "profile/report.html", "pruned/config.json",
                 "pruned/README.md", "eval.csv"):
        assert (out / name).is_file(), name
    assert "Traceback" not in result.stderr


def _stand_ins(folder: Path, tiny_checkpoint, tmp_path: Path) -> dict[str, str]:
    """The inputs the "Using it" block names, as tiny checkpoints and texts; the Hub model
    as a Hub cache entry (HF_HOME), read offline."""
    import json

    from quant_support import quantize_fp8_block

    sample = (ROOT / "sample_data" / "code_py.txt").read_text()
    shutil.copytree(tiny_checkpoint("mixtral"), folder / "my-moe")
    shutil.copytree(tiny_checkpoint("qwen3"), folder / "qwen3-0.6b")
    quantize_fp8_block(tiny_checkpoint("deepseek_v3"), folder / "DeepSeek-V3-FP8")
    (folder / "code.jsonl").write_text("".join(json.dumps({"content": sample[i:i + 2000]}) + "\n"
                                               for i in range(0, 20000, 2000)))
    (folder / "chat").mkdir()
    (folder / "chat" / "a.txt").write_text((ROOT / "sample_data" / "en_docs.txt").read_text()[
        :20000])
    (folder / "val.txt").write_text(sample[-20000:])
    hub = tmp_path / "hf"
    repo = hub / "hub" / "models--mistralai--Mixtral-8x7B-v0.1"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_REVISION)
    shutil.copytree(tiny_checkpoint("mixtral"), repo / "snapshots" / HUB_REVISION)
    return {"HF_HOME": str(hub)}


def test_using_it_block_runs_as_written(clone, tiny_checkpoint, tmp_path):
    readme = (clone / "README.md").read_text()
    block = readme.split("## Using it", 1)[1]
    block = BLOCK.search(block).group(1)
    assert block.lstrip().startswith("source .venv/bin/activate")
    env = _stand_ins(clone, tiny_checkpoint, tmp_path)
    result = run_in(clone, block, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("prof/metadata.json", "plan.json", "my-moe-pruned/config.json",
                 "dsv3-bf16/config.json", "qwen3-8x/config.json"):
        assert (clone / name).is_file(), name
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
