"""`moekit eval` / `evaluate()`: loss, perplexity, KL and top-1 agreement against independent
computations (transformers' own `labels=` loss, a float64 KL)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from prune_support import write_synthetic_stats
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.calib.data import DataSource
from moekit.calib.spec import DataSpec
from moekit.cli.app import app
from moekit.ops.evaluate import evaluate
from moekit.runtime.options import RunOptions

SEQ = 32
CPU = RunOptions(device="cpu")


def _data(sources: list[DataSource], max_tokens: int,
          fraction: tuple[float, float] = (0.0, 1.0)) -> DataSpec:
    """`max_tokens` in total over `sources`, windows of SEQ tokens."""
    return DataSpec(tuple(sources), fraction, seq_len=SEQ, max_tokens=max_tokens)


@pytest.fixture
def texts(tmp_path):
    import json as stdlib_json
    import os

    a = tmp_path / "a.txt"
    a.write_text((os.__doc__ or "") * 3)
    b = tmp_path / "b.txt"
    b.write_text((stdlib_json.__doc__ or "") * 3)
    return {"a": a, "b": b}


def _windows(folder, path, max_tokens):
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(path.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor(ids[:max_tokens])
    return [w for w in ids.split(SEQ) if w.numel() >= 2]


def test_loss_and_kl_match_independent_computation(tiny_checkpoint, texts):
    model_dir, other_dir = tiny_checkpoint("qwen3_moe"), tiny_checkpoint("qwen3_moe", seed=3)
    sources = [DataSource(name, path) for name, path in texts.items()]
    result = evaluate(model_dir, _data(sources, 400), other_dir, run=CPU, batch_size=3,
                      keep_both=True)  # 200 from each; CPU forwards below
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(other_dir).eval()
    totals = [0.0, 0.0, 0.0, 0]
    for row, path in zip(result.domains, texts.values(), strict=True):
        loss_sum = kl_sum = agree = 0.0
        count = 0
        for window in _windows(model_dir, path, 200):
            ids = window.unsqueeze(0)
            with torch.no_grad():
                out = model(input_ids=ids, labels=ids)
                ref_logits = ref(input_ids=ids).logits[0, :-1].double()
            n = window.numel() - 1
            loss_sum += float(out.loss) * n
            p = torch.softmax(ref_logits, -1)
            q = torch.log_softmax(out.logits[0, :-1].double(), -1)
            kl_sum += float((p * (p.log() - q)).sum())
            agree += float((ref_logits.argmax(-1) == q.argmax(-1)).sum())
            count += n
        assert row.tokens == count
        assert row.loss == pytest.approx(loss_sum / count, rel=1e-5)
        assert row.ppl == pytest.approx(math.exp(loss_sum / count), rel=1e-5)
        assert row.kl == pytest.approx(kl_sum / count, rel=1e-4, abs=1e-7)
        assert row.top1 == pytest.approx(agree / count)
        for i, value in enumerate((loss_sum, kl_sum, agree, count)):
            totals[i] += value
    assert result.overall.tokens == totals[3]
    assert result.overall.loss == pytest.approx(totals[0] / totals[3], rel=1e-5)
    assert result.overall.kl == pytest.approx(totals[1] / totals[3], rel=1e-4)
    spilled = evaluate(model_dir, _data(sources, 400), other_dir, run=CPU, batch_size=3,
                       keep_both=False)
    assert spilled.overall.kl == pytest.approx(result.overall.kl, rel=1e-6)
    assert spilled.overall.top1 == result.overall.top1


def test_a_model_against_itself(tiny_checkpoint, texts):
    folder = tiny_checkpoint("mixtral")
    result = evaluate(folder, _data([DataSource("a", texts["a"])], 120, (0.5, 1.0)), folder)
    assert result.overall.kl == pytest.approx(0.0, abs=1e-6) and result.overall.top1 == 1.0
    assert result.settings["data_range"] == [0.5, 1.0]


def test_cli_json_and_export(tiny_checkpoint, texts, tmp_path):
    folder = tiny_checkpoint("mixtral")
    export = tmp_path / "eval.csv"
    result = CliRunner().invoke(app, ["eval", str(folder), "--data", f"a={texts['a']}",
                                      "--data", f"b={texts['b']}", "--seq-len", str(SEQ),
                                      "--max-tokens", "100", "--json", "--export", str(export)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["name"] for d in data["domains"]] == ["a", "b"] and data["ref"] is None
    frame = pd.read_csv(export)
    assert list(frame.name) == ["a", "b", "overall"]
    assert frame.loss.iloc[-1] == pytest.approx(data["overall"]["loss"])
    bad = CliRunner().invoke(app, ["eval", str(folder), "--data", "x=/nonexistent.txt"])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_prune_with_eval_data_records_numbers(tiny_checkpoint, texts, tmp_path):
    folder = tiny_checkpoint("mixtral")
    tokens = {layer: [float(j) for j in range(8)] for layer in (0, 1)}
    stats = write_synthetic_stats(tmp_path / "stats", folder, tokens)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "prune", str(folder), "--stats", str(stats), "--ratio", "0.25", "--out", str(out),
        "--eval-data", f"a={texts['a']}", "--eval-seq-len", str(SEQ),
        "--eval-max-tokens", "100", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "moekit_provenance.json").read_text())
    evaluation = record["evaluation"]
    assert evaluation["ref"] == str(folder) and evaluation["model"] == str(out)
    direct = evaluate(out, _data([DataSource("a", texts["a"])], 100), folder,
                      run=CPU)  # the same device as the recorded numbers: equal to 1e-6
    assert evaluation["overall"]["kl"] == pytest.approx(direct.overall.kl, rel=1e-6)
    assert evaluation["overall"]["kl"] > 0
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and f"{direct.overall.loss:.4f}" in card


@pytest.mark.parametrize("stream", [False, True])
def test_expert_width_the_grouped_kernel_cannot_run(tmp_path, texts, stream):
    """An intermediate width of 30 (120 bytes per fp32 row) makes transformers' default
    `grouped_mm` experts kernel fail; moekit switches to the eager loop, in memory and streamed,
    and gets the loss of an eager transformers forward."""
    from tiny_models import save_tiny

    folder = save_tiny("qwen3_moe", tmp_path / "w30", moe_intermediate_size=30)
    default = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _windows(folder, texts["a"], 100)[0].unsqueeze(0)
    with pytest.raises(RuntimeError, match="16 bytes"):
        default(input_ids=ids)
    eager = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").eval()
    loss_sum = count = 0
    for window in _windows(folder, texts["a"], 100):
        with torch.no_grad():
            loss_sum += float(eager(input_ids=window[None], labels=window[None]).loss) * (
                window.numel() - 1)
        count += window.numel() - 1
    result = evaluate(folder, _data([DataSource("a", texts["a"])], 100), run=CPU, batch_size=2,
                      stream=stream)
    assert result.overall.loss == pytest.approx(loss_sum / count, rel=1e-5)
