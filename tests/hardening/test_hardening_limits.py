"""Issue 24, remaining items: container memory limits, bounded reading of whitespace-free text,
full temp folders, context length and torchrun refusals, plan and tokenizer checks."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hardening_support import MERGE, run, snapshot

from moekit.calib import documents
from moekit.calib.data import DataSource, load_domains
from moekit.runtime import budget
from moekit.runtime.budget import Sizes, decide


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, room", [
    ({"memory.max": "1000000\n", "memory.current": "400000\n",
      "memory.stat": "anon 300000\ninactive_file 100000\n"}, 700000),
    ({"memory/memory.limit_in_bytes": "2000000\n", "memory/memory.usage_in_bytes": "500000\n"},
     1500000),
])
def test_auto_memory_respects_a_cgroup_limit(tmp_path, monkeypatch, files, room):
    """`--max-memory auto` in a container: the cgroup's room, not the host's free RAM."""
    monkeypatch.setattr(budget, "CGROUP_ROOT", _cgroup(tmp_path, files), raising=False)
    monkeypatch.setattr(budget, "host_available", lambda: 1e15, raising=False)
    assert budget.free_memory("cpu") == room
    sizes = Sizes(total=3 * room, resident=100, layers=(room, room), bases=(60, 60),
                  expert=(30, 30))
    plan = decide(sizes, "auto", "cpu")
    assert plan.mode == "stream" and "cgroup limit" in plan.reason
    assert plan.budget == int(0.8 * room)


@pytest.mark.parametrize("files", [
    {"memory.max": "max\n", "memory.current": "5\n"},
    {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, {}])
def test_no_cgroup_limit_leaves_the_host_figure(tmp_path, monkeypatch, files):
    monkeypatch.setattr(budget, "CGROUP_ROOT", _cgroup(tmp_path, files), raising=False)
    monkeypatch.setattr(budget, "host_available", lambda: 123.0)
    assert budget.cgroup_room() is None and budget.free_memory("cpu") == 123.0


class _CharTokenizer:
    """One token per character; records the longest text it was given."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.longest = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        self.longest = max(self.longest, len(text))
        return {"input_ids": [ord(c) for c in text]}


def test_max_tokens_bounds_reading_text_without_whitespace(tmp_path, monkeypatch):
    """A one-line CJK text (no space, no newline) is read only as far as --max-tokens needs
    (a piece holds at most READ_BYTES characters, up to 4 bytes each), not whole."""
    path = tmp_path / "cjk.txt"
    path.write_text("字" * (4 << 20))  # 12 MB, one line
    read: list[int] = []
    real_open = open

    class Counted:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, offset):
            return self.handle.seek(offset)

        def read(self, size):
            data = self.handle.read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(documents, "open", lambda p, mode: Counted(real_open(p, mode)),
                        raising=False)
    tokenizer = _CharTokenizer()
    [domain] = load_domains([DataSource("zh", path)], tokenizer, seq_len=64, max_tokens=1000)
    assert sum(w.numel() for w in domain.windows) == 1000
    assert sum(read) <= 4 * documents.READ_BYTES and tokenizer.longest <= documents.READ_BYTES


def ends_in_one_error(result, needle: str) -> None:
    """Exit 2, the last stderr line is the one error (after the run's notes), no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.output


@pytest.fixture
def full_tmp(tmp_path, monkeypatch) -> Path:
    """TMPDIR pointed at an empty folder (checked for leftovers afterwards)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("command", ["prune", "merge"])
def test_full_tmpdir_while_spilling_calibration_is_one_line(command, model, stats, data_dir,  # noqa: F811
                                                           full_tmp, tmp_path, monkeypatch):
    """safetensors' "No space left" while merge/prune --data spill layers to TMPDIR."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, path, metadata=None):
        if Path(path).is_relative_to(full_tmp):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space "
                                              "left on device (os error 28)")
        return real(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    before = snapshot(model)
    args = (["prune", model, "--criterion", "measured", "--compensate"] if command == "prune"
            else [*MERGE[:1], model, "--stats", stats, *MERGE[1:]])
    result = run(*args, "--ratio", "0.5", "--data", f"fr={data_dir}", "--max-tokens", "128",
                 "--seq-len", "32", "--out", tmp_path / "out")
    ends_in_one_error(result, f"to {full_tmp}")
    assert "No space left on device" in result.stderr and "TMPDIR=" in result.stderr
    assert "needs about" in result.stderr
    assert list(full_tmp.iterdir()) == [] and not (tmp_path / "out").exists()
    assert snapshot(model) == before


def test_full_tmpdir_while_spilling_the_reference_is_one_line(model, data_dir, full_tmp,  # noqa: F811
                                                              tiny_checkpoint, monkeypatch):
    """eval --ref without room for both models spills the reference's log-probabilities."""
    from moekit.ops import evaluate as evaluate_mod

    class Full:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluate_mod, "_fits_both", lambda *a: False)
    monkeypatch.setattr(evaluate_mod, "open", Full, raising=False)
    result = run("eval", model, "--ref", tiny_checkpoint("mixtral"), "--data", f"fr={data_dir}",
                 "--max-tokens", "128", "--seq-len", "32", "--device", "cpu")
    ends_in_one_error(result, f"cannot spill the reference's log-probabilities to {full_tmp}")
    assert "No space left on device" in result.stderr and "needs about" in result.stderr
    assert list(full_tmp.iterdir()) == []


@pytest.mark.parametrize("command", ["prune", "merge", "inspect", "upcycle", "stats"])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_torchrun_refuses_a_command_that_is_not_data_parallel(command, rank, model, stats,  # noqa: F811
                                                              tmp_path, monkeypatch):
    """`torchrun ... -m moekit prune` would have every rank write the same output."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    args = {"prune": ["prune", model, "--stats", stats, "--ratio", "0.5", "--out", out],
            "merge": [*MERGE[:1], model, "--stats", stats, *MERGE[1:], "--out", out],
            "inspect": ["inspect", model],
            "upcycle": ["upcycle", model, "--arch", "mixtral", "-e", "4", "-k", "2", "-o", out],
            "stats": ["stats", "show", stats]}[command]
    before = snapshot(model)
    result = run(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    if rank == "0":
        line = result.stderr.strip()
        assert "\n" not in line and "does not run data-parallel" in line
        assert "2 processes (WORLD_SIZE)" in line and command in line
    else:
        assert result.output == ""
    assert not out.exists() and snapshot(model) == before


@pytest.mark.parametrize("command", ["profile", "eval", "prune", "merge", "upcycle"])
def test_seq_len_past_the_context_is_refused_before_any_forward(command, model, stats,  # noqa: F811
                                                                data_dir, tiny_checkpoint,  # noqa: F811
                                                                tmp_path, monkeypatch):
    """The tiny models' context is 256 positions: --seq-len 300 would run untrained ones."""
    import moekit.runtime.engine

    def no_forward(*args, **kwargs):
        raise AssertionError("a model was opened")

    monkeypatch.setattr(moekit.runtime.engine, "open_model", no_forward)
    out, data = tmp_path / "out", ["--data", f"fr={data_dir}", "--seq-len", "300"]
    args = {"profile": ["profile", model, *data, "--out", out],
            "eval": ["eval", model, *data],
            "prune": ["prune", model, "--ratio", "0.5", *data, "--out", out],
            "merge": [*MERGE[:1], model, "--stats", stats, *MERGE[1:], *data, "--out", out],
            "upcycle": ["upcycle", tiny_checkpoint("llama"), "--arch", "mixtral", "-e", "4",
                        "-k", "2", "--router", "data", *data, "-o", out]}[command]
    before = snapshot(model)
    result = run(*args)
    ends_in_one_error(result, "--seq-len 300 is past the context of")
    assert "(max_position_embeddings 256)" in result.stderr
    assert "pass --seq-len 256 or less" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists() and snapshot(model) == before


def test_expert_group_note_names_the_embeddings_and_head():
    """A budget below one whole layer: the note counts the resident part too (issue 24 item 10)."""
    sizes = Sizes(total=1000, resident=100, layers=(300, 300), bases=(60, 60), expert=(30, 30))
    reason = decide(sizes, 250, "cpu").reason
    assert "embeddings/head 100 B + largest layer 300 B do not fit" in reason


def test_profile_ablation_defaults_to_the_exact_method(model, data_dir, tmp_path,  # noqa: F811
                                                        monkeypatch):
    """The first-order estimate is anti-correlated with the exact one on trained routing: a
    plain `--ablation` measures exactly (issue 24 item 11)."""
    import inspect

    import moekit.ops.profile
    from moekit.errors import DataError

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise DataError("stop here")

    library_default = inspect.signature(moekit.ops.profile.profile_model).parameters[
        "ablation_method"].default
    monkeypatch.setattr(moekit.ops.profile, "profile_model", capture)
    result = run("profile", model, "--data", f"fr={data_dir}", "--ablation", "--out",
                 tmp_path / "p")
    assert result.exit_code == 2 and seen["ablation_method"] == "exact"
    assert library_default == "exact"


@pytest.mark.parametrize("command", ["prune", "merge"])
def test_model_card_names_a_protected_super_expert(command, model, stats, tmp_path):  # noqa: F811
    """A super expert kept by --protect-super is named in the output's README.md."""
    import pandas as pd

    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.stats.expert_stats import STATS_CSV, STATS_PARQUET

    first = describe(Checkpoint(model)).moe_layers[0].index
    frame = pd.read_parquet(stats / STATS_PARQUET)
    frame.loc[(frame["layer"] == first) & (frame["expert"] == 2), "max_norm"] = 1e3
    frame.to_parquet(stats / STATS_PARQUET, index=False)
    frame.to_csv(stats / STATS_CSV, index=False)
    out = tmp_path / "out"
    args = (["prune", model, "--stats", stats, "--ratio", "0.5"] if command == "prune" else
            [*MERGE[:1], model, "--stats", stats, *MERGE[1:], "--method", "average"])
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "## Protected experts" in card and "super experts" in card
    assert f"- layer {first}: expert 2\n" in card


def _edited_plan(command: str, model: Path, stats: Path, tmp_path: Path, edit) -> Path:  # noqa: F811, E501
    """A --dry-run --plan-out plan of `command`, changed by `edit(dict)`."""
    import json

    plan = tmp_path / "plan.json"
    args = (["prune", model, "--stats", stats, "--ratio", "0.5"] if command == "prune" else
            [*MERGE[:1], model, "--stats", stats, *MERGE[1:], "--method", "average"])
    assert run(*args, "--dry-run", "--plan-out", plan).exit_code == 0
    data = json.loads(plan.read_text())
    edit(data)
    plan.write_text(json.dumps(data))
    return plan


def test_a_plan_listing_a_layer_twice_says_so(model, stats, tmp_path):  # noqa: F811
    plan = _edited_plan("prune", model, stats, tmp_path,
                        lambda d: d["layers"].append(dict(d["layers"][0])))
    layer = __import__("json").loads(plan.read_text())["layers"][0]["layer"]
    result = run("prune", model, "--plan", plan, "--out", tmp_path / "out")
    ends_in_one_error(result, f"plan lists layer {layer} twice")
    assert "missing []" not in result.stderr and not (tmp_path / "out").exists()


def test_a_nan_merge_weight_in_a_plan_is_refused(model, stats, tmp_path):  # noqa: F811
    def poison(data):
        cluster = next(i for i, c in enumerate(data["layers"][0]["clusters"]) if len(c) > 1)
        data["layers"][0]["weights"][cluster][0] = float("nan")

    plan = _edited_plan("merge", model, stats, tmp_path, poison)
    before = snapshot(model)
    result = run("merge", model, "--plan", plan, "--out", tmp_path / "out")
    ends_in_one_error(result, "weights must give one finite non-negative number")
    assert "got nan" in result.stderr
    assert not (tmp_path / "out").exists() and snapshot(model) == before


def test_a_broken_tokenizer_is_named(model, data_dir):  # noqa: F811
    """tokenizers' own errors (here a KeyError) come with the file they came from."""
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    result = run("eval", model, "--data", f"fr={data_dir}", "--max-tokens", "64",
                 "--device", "cpu")
    ends_in_one_error(result, f"cannot load the tokenizer from {model / 'tokenizer.json'}")
    assert "KeyError" in result.stderr


def test_a_tokenizer_linked_outside_the_folder_is_announced(model, stats, tmp_path):  # noqa: F811
    outside = tmp_path / "elsewhere.json"
    (model / "tokenizer.json").rename(outside)
    (model / "tokenizer.json").symlink_to(outside)
    out = tmp_path / "out"
    result = run("prune", model, "--stats", stats, "--ratio", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any(f"{model / 'tokenizer.json'} links outside the model folder" in line
               and "not copied" in line for line in warning), result.stderr
    assert not (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()


def _rendered(renderable, width: int) -> str:
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(renderable)
    return console.export_text()


def test_layer_table_folds_at_80_columns_instead_of_dropping():
    """Every column of the per-layer table is printed on an 80-column terminal (issue 24 item 9)."""
    import numpy as np
    from synthetic_profile import synthetic_profile

    from moekit.stats.report import layer_rich_table

    profile, _ = synthetic_profile([np.linspace(1, 2, 8)] * 2, k=2, tokens=300000)
    for width in (80, 60, 200):
        text = _rendered(layer_rich_table(profile), width)
        assert all(len(line) <= width for line in text.splitlines())
        for header in ("tokens", "entropy", "N@90%", "reuse"):
            assert header in text, (width, text)
        assert ("(continued)" in text) == (width < 100)


def test_heatmap_never_labels_a_used_expert_zero():
    from moekit.stats.plots import cell_label

    assert [cell_label(v) for v in (0.0, 0.04, 0.00003, 0.06, 1.26)] == \
        ["0.0", "0.04", "3e-05", "0.1", "1.3"]


def test_uncertainty_explains_growth_and_counts_whole_slots(tmp_path):
    import numpy as np
    from synthetic_profile import synthetic_profile

    from moekit.stats.profile_io import save_profile
    from moekit.stats.uncertainty import profile_uncertainty

    profile, _ = synthetic_profile([np.r_[1.0, 1.0, np.linspace(1.5, 3, 6)]] * 2, k=2,
                                   tokens=1280, window=32)
    _, layers = profile_uncertainty(profile, ratio=0.25, seed=3)
    assert all(n is None or isinstance(n, int) for n in layers["more_slots"].tolist())
    (tmp_path / "p").mkdir()
    save_profile(profile, tmp_path / "p")
    result = run("stats", "uncertainty", tmp_path / "p", "--ratio", "0.25")
    assert result.exit_code == 0, result.output
    assert "growth: how many times the calibration data must grow" in result.stdout
    assert "more_slots: the routed slots to add" in result.stdout
    assert not any(".0 |" in line for line in result.stdout.splitlines() if "|" in line)


def test_eval_warns_on_the_calibration_text(model, data_dir, tmp_path):  # noqa: F811
    """A model pruned from a profile of fr.txt[0:0.8]: eval on it without a held-out range
    says its loss is not held out; the last 10% is quiet (issue 24 item 6)."""
    import json

    profile = tmp_path / "prof"
    profile.mkdir()
    (profile / "metadata.json").write_text(json.dumps({"data_range": "0:0.8", "domains": {
        "fr": {"sha256": "0" * 16, "files": [str(data_dir / "fr.txt")]}}}))
    (model / "moekit_provenance.json").write_text(json.dumps(
        {"operation": "prune", "stats": {"folder": str(profile), "sha256": "x"}}))
    args = ("eval", model, "--data", f"fr={data_dir}", "--max-tokens", "64", "--seq-len", "32",
            "--device", "cpu")
    seen = run(*args)
    assert seen.exit_code == 0, seen.output
    assert "warning: eval data 'fr' overlaps the text model was calibrated on (profile " \
        in seen.stderr and "range 0:0.8" in seen.stderr
    held_out = run(*args, "--data-range", "0.9:1")
    assert held_out.exit_code == 0 and "warning" not in held_out.stderr


ROOT = Path(__file__).parents[2]


def test_readme_and_demo_are_followable_and_held_out():
    """Items 2-6: the CLI is reached through .venv, timings say on what, profile.md's limits
    are current, the demo prunes by the default criterion and evaluates on held-out text."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    using = readme[readme.index("## Using it"):]
    block = using[using.index("```bash"):using.index("```", using.index("```bash") + 3)]
    assert block.splitlines()[1].startswith("source .venv/bin/activate")
    assert "`python scripts/build_demo_model.py" not in readme
    for claim in re.findall(r"[^.]*(?:about a minute|under three minutes)[^.;)]*", readme):
        assert "x86-64 cores" in " ".join(claim.split()), claim
    limits = (ROOT / "docs" / "profile.md").read_text().split("## Limits")[1]
    assert "not implemented yet" not in limits and "streamed layer by layer" in limits
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "--criterion reap" not in demo
    evals = [line for line in demo.splitlines() if line.startswith("$M eval")]
    assert evals and all("--data-range 0.9:1" in line for line in evals)


def test_prune_with_data_shows_what_the_plan_removes(model, data_dir, tmp_path):  # noqa: F811
    """The plan table of `prune --data` gives traffic/weight removed on the calibration tokens
    (issue 24 item 8)."""
    import json

    out = tmp_path / "pruned"  # `--data --dry-run` stops at the cost estimate: run it whole
    result = run("prune", model, "--data", f"fr={data_dir}", "--ratio", "0.5", "--criterion",
                 "frequency", "--max-tokens", "128", "--seq-len", "32", "--device", "cpu",
                 "--out", out)
    assert result.exit_code == 0, result.output
    budget = json.loads((out / "moekit_provenance.json").read_text())["budget"]
    assert budget
    for row in budget:
        assert 0 <= row["traffic_removed"] <= 1 and 0 <= row["weight_removed"] <= 1, row


def test_merge_shows_the_experts_kept_alone(model, stats, tmp_path):  # noqa: F811
    """8 -> 6 experts leaves singletons: the plan table and the model card list them."""
    import json

    from moekit.cli.merge_cmd import clusters_table
    from moekit.ops.merge.plan import MergePlan

    plan_file, out = tmp_path / "plan.json", tmp_path / "out"
    args = [*MERGE[:1], model, "--stats", stats, "--ratio", "0.25", "--group", "weight",
            "--method", "average"]
    assert run(*args, "--dry-run", "--plan-out", plan_file).exit_code == 0
    plan = MergePlan.load(plan_file)
    text = _rendered(clusters_table(plan), 300)
    card = run(*args, "--out", out)
    assert card.exit_code == 0, card.output
    card_text = (out / "README.md").read_text()
    for p in json.loads(plan_file.read_text())["layers"]:
        for i, cluster in enumerate(p["clusters"]):
            if len(cluster) == 1:
                assert f"{i}<-{cluster[0]}" in text and f"{i} <- {cluster[0]}" in card_text


def test_merge_evaluates_its_output_with_eval_data(model, stats, data_dir, tmp_path):  # noqa: F811
    """merge --eval-data, through prune's code path: numbers in the provenance and the card."""
    import json

    out = tmp_path / "out"
    result = run(*MERGE[:1], model, "--stats", stats, *MERGE[1:], "--method", "average",
                 "--eval-data", f"fr={data_dir}", "--eval-max-tokens", "64", "--eval-seq-len",
                 "32", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "moekit_provenance.json").read_text())["evaluation"]
    assert evaluation["ref"] == str(model) and evaluation["domains"][0]["name"] == "fr"
    assert evaluation["overall"]["kl"] >= 0 and evaluation["model"] == str(out)
    assert "## Evaluation" in (out / "README.md").read_text()
    missing = run(*MERGE[:1], model, "--stats", stats, *MERGE[1:], "--eval-data",
                  f"fr={tmp_path / 'nope.txt'}", "--out", tmp_path / "out2")
    ends_in_one_error(missing, "does not exist")
    assert not (tmp_path / "out2").exists()


def test_uncertainty_covers_every_criterion_the_default_first(tiny_checkpoint, data_dir,  # noqa: F811
                                                               tmp_path):
    """Per-window weight and EAN sums are recorded, so `stats uncertainty` (default ean) and
    the report's stability section cover prune's default criterion (issue 24 item 3)."""
    import numpy as np

    from moekit.stats.profile_io import load_profile
    from moekit.stats.uncertainty import CRITERIA, profile_uncertainty

    out = tmp_path / "p"
    result = run("profile", tiny_checkpoint("qwen2_moe"), "--out", out, "--data",
                 f"fr={data_dir}", "--seq-len", "32", "--max-tokens", "400", "--device", "cpu",
                 "--no-plots")
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    for layer in profile.moe_layers:
        for column in ("weight_sum", "ean_sum"):
            assert np.allclose(profile.windows[f"fr/{layer}/{column}"].sum(axis=0),
                               profile.experts(layer, "fr")[column], rtol=1e-4)
    assert CRITERIA[0] == "ean"
    for criterion in CRITERIA:
        _, layers = profile_uncertainty(profile, ratio=0.25, criterion=criterion,
                                        replicates=200)
        assert len(layers) == len(profile.moe_layers)
    shown = run("stats", "uncertainty", out, "--replicates", "200")
    assert shown.exit_code == 0 and "Pruning 25% of each layer's experts by ean" in shown.stdout
    from moekit.stats.report import _uncertainty_section

    report = "\n".join(_uncertainty_section(profile))
    assert "by `ean` (the criterion `moekit prune` uses by default)" in report
    ablation = run("stats", "uncertainty", out, "--criterion", "ablation")
    ends_in_one_error(ablation, "criterion 'ablation' has no per-window values to resample")
