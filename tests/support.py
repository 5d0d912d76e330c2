"""Helpers shared by several test files, so that no test file imports another's: CLI runners,
synthetic statistics, a sharded copy of a checkpoint, tiny checkpoints with sharpened routers
and the pieces of the measured-selection tests, the calibration corpus and the calibrated
choice, and the streamed-vs-in-memory profile comparison. (Model builders are in
`tiny_models.py`; statistics in the profile contract in `prune_support.py`.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from prune_support import write_synthetic_stats
from tiny_models import _docstring_corpus, build_model, tokenizer
from typer.testing import CliRunner

from moekit.calib.capture import moe_blocks
from moekit.calib.data import DataSource
from moekit.calib.routing import Routing
from moekit.calib.spec import DataSpec
from moekit.cli.app import app
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.io.writer import OutTensor, write_checkpoint
from moekit.layerfit.measured import apply_fit, grouping
from moekit.layerfit.override import PrunedLayers
from moekit.layerfit.reconstruct import apply_gate_up, in_memory_interleaved
from moekit.layerfit.router_fit import apply_router
from moekit.ops.prune.calibrated import DataOptions, choose_with_data
from moekit.runtime.loading import load_model
from moekit.runtime.options import RunOptions

RUNNER = CliRunner()


# ---- the CLI ---------------------------------------------------------------------------------

def run(command: str, *args: object):
    return RUNNER.invoke(app, [command, *map(str, args)])


def merge(*args: object):
    return RUNNER.invoke(app, ["merge", *map(str, args)])


def stats_for(tmp_path: Path, folder: Path) -> Path:
    """Synthetic statistics of `folder` (distinct per expert) in `tmp_path / "stats"`."""
    layout = describe(Checkpoint(folder))
    tokens = {layer.index: [float((5 * j + 2) % 9 + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    return write_synthetic_stats(tmp_path / "stats", folder, tokens)


def sharded_copy(src: Path, dst: Path) -> Path:
    """`src` rewritten as several Hub-named shards + index (moekit's own writer)."""
    dst.mkdir()
    source = Checkpoint(src)
    write_checkpoint(dst, [OutTensor.copy(i) for i in source.tensors.values()],
                     max_shard_bytes=150_000)
    shutil.copyfile(src / "config.json", dst / "config.json")
    return dst


# ---- measured selection on tiny checkpoints ---------------------------------------------------

def saved_checkpoint(model_type: str, folder, seed: int = 0):
    """A tiny checkpoint whose routers are sharpened and selection biases random."""
    model = build_model(model_type, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("e_score_correction_bias"):
            tensor.data.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
        elif name.endswith(("gate.weight", "router.weight")) and tensor.dim() == 2:
            tensor.data.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def random_tokens(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, 32), generator=gen) for _ in range(n)]


def block_output(block, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = block(x.unsqueeze(0))
    y = y[0] if isinstance(y, tuple) else y
    return y.reshape(-1, y.shape[-1])


def measured_setup(model_type: str, tmp_path):
    """(folder, model in float32, layout, fingerprint) of a `saved_checkpoint`."""
    folder = saved_checkpoint(model_type, tmp_path / "src")
    model = load_model(folder, "cpu", "float32")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    return folder, model, layout, model_fingerprint(checkpoint, layout)


def keep_for(layout, num: int, n_drop: int) -> dict[int, list[int]]:
    """A removal set per layer (different per layer), balanced over routing groups."""
    groups, _ = grouping(layout, num, n_drop)
    size = num // groups
    keep = {}
    for i, layer in enumerate(layout.moe_layers):
        per_group = n_drop // groups
        dropped = [g * size + (i + j) % size for g in range(groups) for j in range(per_group)]
        keep[layer.index] = [e for e in range(num) if e not in dropped]
    return keep


# ---- the calibrated choice -------------------------------------------------------------------

def doc_corpus(tmp_path) -> DataSource:
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_docstring_corpus()[:1500]))
    return DataSource("doc", text)


def choose(folder, source: DataSource, ratio: float, *, width=None, stream=False,
           criterion="measured", compensate=True):
    """Calibrated choice on a tiny model (float32, CPU), in memory or streamed."""
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    options = DataOptions(DataSpec((source,), seq_len=64), max_tokens=1024, beam=2,
                          compensate=compensate, router=True, protect_super=False, width=width,
                          run=RunOptions(device="cpu", dtype="float32"),
                          stream=stream, hidden_ram=0 if stream else None)
    return choose_with_data(folder, layout, model_fingerprint(checkpoint, layout),
                            criterion=criterion, ratio=ratio, protect={}, min_experts=None,
                            options=options, log=lambda _: None)


def in_memory_logits(folder, candidate, batch: torch.Tensor) -> torch.Tensor:
    """The unpruned model with the candidate's re-routing and refits applied as hooks."""
    layout = describe(Checkpoint(folder))
    model = load_model(folder, "cpu", "float32")
    blocks = {b.layer: b for b in moe_blocks(model, layout.family)}
    routing = Routing.of(layout.family, layout.config).after_prune(
        candidate.plan.config_changes)
    with PrunedLayers() as pruned, torch.no_grad():
        for p in candidate.plan.layers:
            pruned.add(blocks[p.layer], p.kept, routing, layout.family.router.logits_index)
            apply_fit(blocks[p.layer], candidate.weights.get(p.layer, {}))
            apply_router(blocks[p.layer].router, candidate.routers.get(p.layer))
            apply_gate_up(blocks[p.layer].experts, candidate.gate_up.get(p.layer, {}),
                          in_memory_interleaved(layout))
        return model(batch).logits


# ---- streamed vs in memory -------------------------------------------------------------------

SETTINGS = dict(batch_size=3, run=RunOptions(device="cpu", dtype="float32"))


def budgeted(max_memory: str | int) -> dict:
    """SETTINGS with the weight-memory budget `max_memory`."""
    return dict(SETTINGS, run=RunOptions(device="cpu", dtype="float32", max_memory=max_memory))


def spec(sources: list[DataSource]) -> DataSpec:
    """The streamed-vs-in-memory tests' data: 150 tokens in total, windows of 24."""
    return DataSpec(tuple(sources), seq_len=24, max_tokens=150)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[DataSource]:
    import json
    import os

    folder = tmp_path_factory.mktemp("stream-texts")
    (folder / "a.txt").write_text((os.__doc__ or "") * 2)
    (folder / "b.txt").write_text((json.__doc__ or "") * 2)
    return [DataSource("a", folder / "a.txt"), DataSource("b", folder / "b.txt")]


def assert_same_profile(streamed, memory) -> None:
    s, m = streamed.expert_stats, memory.expert_stats
    assert (s["tokens"].to_numpy() == m["tokens"].to_numpy()).all()
    for column in ("weight_sum", "ean_sum", "reap_sum", "max_norm"):
        np.testing.assert_allclose(s[column], m[column], rtol=1e-5, atol=1e-6, err_msg=column)
    for column in ("tokens", "top1_pairs", "top1_repeats"):
        assert (streamed.layer_stats[column] == memory.layer_stats[column]).all(), column
    np.testing.assert_allclose(streamed.layer_stats["entropy_sum"],
                               memory.layer_stats["entropy_sum"], rtol=1e-5)
    assert streamed.coactivation.keys() == memory.coactivation.keys()
    for key, value in memory.coactivation.items():
        assert (streamed.coactivation[key] == value).all(), key


def with_mtp_layer(source: Path, folder: Path) -> Path:
    """A copy of the tiny DeepSeek-V3 `source` (3 layers) with an MTP block stored as layer 3,
    as the Hub stores DeepSeek-V3's (`model.layers.{num_hidden_layers}.*`, plus `eh_proj`)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in weights.items()
           if k.startswith("model.layers.2.")}
    mtp["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file({**weights, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
