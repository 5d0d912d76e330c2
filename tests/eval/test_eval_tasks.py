"""`moekit eval --tasks`: a local multiple-choice and a local generative lm-eval task (YAML +
JSONL built here from sample_data/, offline) on a trained tiny MoE and its pruned copy; the
numbers equal those of lm-eval's own Python API called directly on the same checkpoints."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app

lm_eval = pytest.importorskip("lm_eval")  # the `tasks` extra (installed with `dev`)
runner = CliRunner()
LIMIT = 12


@pytest.fixture(scope="module")
def task_files(sample_texts, tmp_path_factory):
    """(mc.yaml, gen.yaml): next-word choice among 4 and next-word generation, on the last
    tenth of each sample text (held out from the trained models)."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    mc, gen = [], []
    for path in sample_texts.values():
        words = path.read_text().split()
        start = len(words) * 9 // 10
        for i in range(start, start + 200, 40):
            right, context = words[i + 8], " ".join(words[i:i + 8])
            choices = [right] + [words[rng.randrange(start, len(words))] for _ in range(3)]
            rng.shuffle(choices)
            mc.append({"context": context, "choices": [" " + c for c in choices],
                       "label": choices.index(right)})
            gen.append({"prompt": context, "target": " " + right})
    for name, docs in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: moekit_test_mc\n" + head.format(folder / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: moekit_test_gen\n" + head.format(folder / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder / "mc.yaml", folder / "gen.yaml"


def direct(model_path, folder) -> dict:
    """lm-eval's own API on transformers' own loading of the checkpoint."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_path),
              batch_size=4, device="cpu")
    result = lm_eval.simple_evaluate(model=lm, tasks=["moekit_test_mc", "moekit_test_gen"],
                                     task_manager=TaskManager(include_path=str(folder)),
                                     limit=LIMIT, log_samples=False)
    return result["results"]


def test_tasks_equal_lm_evals_own_api(trained_checkpoint, task_files, tmp_path):
    moe = trained_checkpoint("moe")
    pruned = tmp_path / "pruned"
    assert runner.invoke(app, ["prune", str(moe), "--criterion", "frequency", "--ratio", "0.5",
                               "--stats", str(_profile(moe, tmp_path)), "--out",
                               str(pruned)]).exit_code == 0
    out = tmp_path / "scores.json"
    mc, gen = task_files
    result = runner.invoke(app, ["eval", str(pruned), "--ref", str(moe), "--tasks",
                                 f"{mc},{gen}", "--limit", str(LIMIT), "--device", "cpu",
                                 "--tasks-out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["task"], r["metric"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("moekit_test_mc", "acc,none"), ("moekit_test_gen", "exact_match,none")}
    theirs, original = direct(pruned, mc.parent), direct(moe, mc.parent)
    for (task, metric), row in rows.items():
        assert row["model"] == pytest.approx(theirs[task][metric], abs=1e-9)
        assert row["ref"] == pytest.approx(original[task][metric], abs=1e-9)
    assert "retained" in result.output


def _profile(model, tmp_path):
    out = tmp_path / "prof"
    result = runner.invoke(app, ["profile", str(model), "--max-tokens", "4096", "--no-plots",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_unknown_task_is_refused_before_loading(trained_checkpoint):
    result = runner.invoke(app, ["eval", str(trained_checkpoint("moe")), "--tasks",
                                 "no_such_task_xyz"])
    assert result.exit_code != 0 and "knows no task" in result.output
