"""`moekit profile` and `moekit stats merge` through the CLI: output contract, merge algebra,
trace, exports, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.stats.profile_io import EXPERT_COLUMNS, load_profile, load_trace

FAST = ["--seq-len", "32", "--max-tokens", "200", "--batch-size", "3", "--device", "cpu",
        "--no-plots"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Three small text files (stdlib docstrings) and a JSONL file."""
    import collections
    import json as json_module
    import os

    folder = tmp_path_factory.mktemp("texts")
    out = {}
    for name, module in (("osdoc", os), ("jsondoc", json_module), ("coll", collections)):
        docs = [getattr(module, a).__doc__ or "" for a in dir(module) if not a.startswith("_")]
        out[name] = folder / f"{name}.txt"
        out[name].write_text((module.__doc__ or "") + "\n".join(d for d in docs if d)[:6000])
    out["jsonl"] = folder / "records.jsonl"
    out["jsonl"].write_text("\n".join(json.dumps({"body": line}) for line in
                                      out["osdoc"].read_text().splitlines()[:50] if line))
    return out


def run(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def profile_dir(model: Path, out: Path, *data: str, extra: tuple[str, ...] = ()) -> Path:
    result = run("profile", model, "--out", out, *sum((["--data", d] for d in data), []), *FAST,
                 *extra)
    assert result.exit_code == 0, result.output
    return out


def test_profile_writes_the_contract(tiny_checkpoint, texts, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    out = profile_dir(model, tmp_path / "p", f"a={texts['osdoc']}", f"b={texts['jsondoc']}",
                      extra=("--export", str(tmp_path / "layers.csv"), "--export-coldest",
                             str(tmp_path / "cold.json")))
    for name in ("expert_stats.csv", "expert_stats.parquet", "layer_stats.csv",
                 "coactivation.npz", "metadata.json"):
        assert (out / name).exists(), name
    csv = pd.read_csv(out / "expert_stats.csv")
    parquet = pd.read_parquet(out / "expert_stats.parquet")
    assert list(csv.columns) == EXPERT_COLUMNS == list(parquet.columns)
    pd.testing.assert_frame_equal(csv, parquet)
    assert str(parquet["tokens"].dtype) == "int64" and str(parquet["reap_sum"].dtype) == "float64"
    meta = json.loads((out / "metadata.json").read_text())
    for key in ("moekit_version", "model", "model_fingerprint", "family", "num_layers",
                "moe_layers", "num_experts", "top_k", "seq_len", "domains", "created"):
        assert key in meta, key
    assert meta["family"] == "qwen3_moe" and meta["num_experts"] == 8 and meta["top_k"] == 2
    assert set(meta["domains"]) == {"a", "b"}
    assert set(csv["domain"]) == {"a", "b", "all"}
    assert len(csv) == len(meta["moe_layers"]) * 8 * 3
    for layer in meta["moe_layers"]:
        rows = csv[csv["layer"] == layer]
        for domain, info in meta["domains"].items():
            assert rows[rows["domain"] == domain]["tokens"].sum() == 2 * info["tokens"]
        totals = rows[rows["domain"] != "all"].groupby("expert")[["tokens", "reap_sum"]].sum()
        all_rows = rows[rows["domain"] == "all"].set_index("expert")
        np.testing.assert_array_equal(totals["tokens"], all_rows["tokens"])
        np.testing.assert_allclose(totals["reap_sum"], all_rows["reap_sum"], rtol=1e-12)
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers["layer"]) == meta["moe_layers"]
    assert len(json.loads((tmp_path / "cold.json").read_text())) == 10


def test_profile_is_readable_by_prune(tiny_checkpoint, texts, tmp_path):
    """The contract as `moekit prune` reads it (stdlib CSV reader)."""
    prune_stats = pytest.importorskip("moekit.stats.expert_stats")
    model = tiny_checkpoint("mixtral")
    out = profile_dir(model, tmp_path / "p", f"a={texts['osdoc']}")
    stats = prune_stats.load_stats(out)
    frame = load_profile(out).expert_stats
    for layer in stats.layers:
        rows = frame[(frame["layer"] == layer) & (frame["domain"] == "all")].sort_values("expert")
        assert list(stats.column(layer, "tokens")) == list(rows["tokens"].astype(float))
        assert list(stats.column(layer, "reap_sum")) == list(rows["reap_sum"])


def test_merge_of_disjoint_data_equals_profile_of_both(tiny_checkpoint, texts, tmp_path):
    model = tiny_checkpoint("olmoe")
    a = profile_dir(model, tmp_path / "a", f"a={texts['osdoc']}")
    b = profile_dir(model, tmp_path / "b", f"b={texts['coll']}")
    both = profile_dir(model, tmp_path / "ab", f"a={texts['osdoc']}", f"b={texts['coll']}",
                       extra=("--max-tokens", "400"))  # in total: 200 from each, as a and b
    result = run("stats", "merge", a, b, "--out", tmp_path / "m", "--no-plots")
    assert result.exit_code == 0, result.output
    merged, expected = load_profile(tmp_path / "m"), load_profile(both)
    keys = ["layer", "domain", "expert"]
    got = merged.expert_stats.sort_values(keys).reset_index(drop=True)
    want = expected.expert_stats.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[keys + ["tokens"]], want[keys + ["tokens"]])
    for column in ("weight_sum", "ean_sum", "reap_sum", "max_norm"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-12, atol=0)
    assert merged.coactivation.keys() == expected.coactivation.keys()
    for key, value in expected.coactivation.items():
        np.testing.assert_array_equal(merged.coactivation[key], value)
    raw = ["layer", "domain", "tokens", "top1_pairs", "top1_repeats"]
    pd.testing.assert_frame_equal(
        merged.layer_stats[raw].sort_values(["layer", "domain"]).reset_index(drop=True),
        expected.layer_stats[raw].sort_values(["layer", "domain"]).reset_index(drop=True))
    np.testing.assert_allclose(merged.layer_stats.sort_values(["layer", "domain"])["entropy_sum"],
                               expected.layer_stats.sort_values(["layer", "domain"])[
                                   "entropy_sum"], rtol=1e-12)
    assert merged.metadata["domains"] == expected.metadata["domains"]


def test_same_named_domains_add_up(tiny_checkpoint, texts, tmp_path):
    model = tiny_checkpoint("mixtral")
    a = profile_dir(model, tmp_path / "a", f"x={texts['osdoc']}")
    b = profile_dir(model, tmp_path / "b", f"x={texts['coll']}")
    merged = profile_dir(model, tmp_path / "m", f"y={texts['jsondoc']}",
                         extra=("--merge-with", str(a)))
    result = run("stats", "merge", merged, b, "--out", tmp_path / "final", "--no-plots")
    assert result.exit_code == 0, result.output
    final, pa, pb = (load_profile(p) for p in (tmp_path / "final", a, b))
    assert final.domains == ["y", "x"]
    assert final.metadata["domains"]["x"]["tokens"] == (pa.metadata["domains"]["x"]["tokens"] +
                                                        pb.metadata["domains"]["x"]["tokens"])
    x = final.expert_stats.query("domain == 'x'").set_index(["layer", "expert"]).sort_index()
    parts = pd.concat([pa.expert_stats, pb.expert_stats]).query("domain == 'x'")
    summed = parts.groupby(["layer", "expert"]).agg(
        {"tokens": "sum", "reap_sum": "sum", "max_norm": "max"}).sort_index()
    np.testing.assert_array_equal(x["tokens"], summed["tokens"])
    np.testing.assert_allclose(x["reap_sum"], summed["reap_sum"], rtol=1e-12)
    np.testing.assert_array_equal(x["max_norm"], summed["max_norm"])


def test_trace_matches_counts_and_plots_are_written(tiny_checkpoint, texts, tmp_path):
    model = tiny_checkpoint("deepseek_v3")
    out = tmp_path / "t"
    result = run("profile", model, "--out", out, "--data", f"a={texts['osdoc']}", "--trace",
                 *FAST[:-1], "--plot-layer", "2")
    assert result.exit_code == 0, result.output
    trace, profile = load_trace(out), load_profile(out)
    tokens = profile.metadata["domains"]["a"]["tokens"]
    assert trace["a/input_ids"].shape == (tokens,)
    for layer in profile.moe_layers:
        ids = trace[f"a/layer_{layer}/ids"].astype(np.int64)
        assert ids.shape == (tokens, 2) and trace[f"a/layer_{layer}/weights"].shape == (tokens, 2)
        counts = np.bincount(ids.reshape(-1), minlength=8)
        np.testing.assert_array_equal(profile.experts(layer, "a")["tokens"], counts)
    for name in ("usage_heatmap.png", "specialisation.png", "load_curves.png",
                 "coactivation_layer2.png", "report.md"):
        assert (out / name).stat().st_size > 1000, name
    assert "specialisation.png" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------ bad input
def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_bad_inputs_give_one_line_errors(tiny_checkpoint, texts, tmp_path):
    model = tiny_checkpoint("mixtral")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    cases = [
        (["--data", f"e={empty}"], ["empty"]),
        (["--data", f"m={tmp_path / 'nope.txt'}"], ["does not exist"]),
        (["--data", f"j={texts['jsonl']}"], ["no field 'text'", "--text-field"]),
        (["--data", f"a={texts['osdoc']}", "--max-tokens", "0"], ["--max-tokens"]),
        (["--data", f"all={texts['osdoc']}"], ["reserved"]),
        (["--data", f"a={texts['osdoc']}", "--dtype", "int8"], ["--dtype"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run("profile", model, "--out", out, *args, "--device", "cpu"),
                              *needles)
        assert not out.exists()
    ok = run("profile", model, "--out", out, "--data", f"j={texts['jsonl']}", "--text-field",
             "body", *FAST)
    assert ok.exit_code == 0, ok.output
    assert_one_line_error(run("profile", model, "--out", out, "--data", f"a={texts['osdoc']}",
                              *FAST), "exists", "--overwrite")
    assert_one_line_error(run("profile", tiny_checkpoint("llama"), "--out", tmp_path / "d",
                              "--data", f"a={texts['osdoc']}", *FAST), "dense", "no router")


def test_model_without_tokenizer_asks_for_one(tiny_checkpoint, texts, tmp_path):
    source = tiny_checkpoint("mixtral")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    result = run("profile", bare, "--out", tmp_path / "o", "--data", f"a={texts['osdoc']}", *FAST)
    assert_one_line_error(result, "tokenizer", "--tokenizer")
    ok = run("profile", bare, "--out", tmp_path / "o", "--data", f"a={texts['osdoc']}",
             "--tokenizer", str(source), *FAST)
    assert ok.exit_code == 0, ok.output


def test_merging_profiles_of_different_models_fails(tiny_checkpoint, texts, tmp_path):
    one = profile_dir(tiny_checkpoint("mixtral"), tmp_path / "one", f"a={texts['osdoc']}")
    other_model = tiny_checkpoint("mixtral", seed=1)
    result = run("profile", other_model, "--out", tmp_path / "two", "--data",
                 f"a={texts['osdoc']}", "--merge-with", one, *FAST)
    assert_one_line_error(result, "another model", "fingerprint")
    assert not (tmp_path / "two").exists()
    two = profile_dir(other_model, tmp_path / "two", f"a={texts['osdoc']}")
    assert_one_line_error(run("stats", "merge", one, two, "--out", tmp_path / "m"),
                          "different models")
    (tmp_path / "junk").mkdir()
    assert_one_line_error(run("stats", "merge", tmp_path / "junk", "--out", tmp_path / "m2"),
                          "not a moekit profile")
