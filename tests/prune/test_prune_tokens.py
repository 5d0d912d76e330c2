"""The memory-aware default calibration token count (`layerfit.tokens`): an explicit
--max-tokens is never lowered; the default fits the memory --max-memory leaves beside the
weights, in steps of 1024 positions between MIN_TOKENS and the command's default (DEFAULT_TOKENS
for merge, PRUNE_TOKENS for prune)."""

from __future__ import annotations

import pytest
from support import choose, doc_corpus, run, saved_checkpoint, stats_for

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.layerfit.tokens import (
    DEFAULT_TOKENS,
    MIN_TOKENS,
    PRUNE_TOKENS,
    calibration_tokens,
    per_token_bytes,
    reconstruct_bytes,
)
from moekit.runtime.options import RunOptions


def _cpu(max_memory: int) -> RunOptions:
    """A float32 CPU run under `max_memory` bytes."""
    return RunOptions(device="cpu", dtype="float32", max_memory=max_memory)


def _call(layout) -> int:
    """One experts call's transient for the float32 tiny model, from its dimensions: rows of
    EXPERT_BYTES / (4 H), each with 2 H + 4 I float32 values, and two float64 chunks."""
    from moekit.layerfit.replay import CHUNK_BYTES, EXPERT_BYTES

    hidden, width = int(layout.config["hidden_size"]), int(layout.config["intermediate_size"])
    return EXPERT_BYTES // (4 * hidden) * 4 * (2 * hidden + 4 * width) + 2 * CHUNK_BYTES


def _weights(folder) -> int:
    """Bytes of the tiny float32 checkpoint's tensors (it fits in memory: all are held)."""
    return sum(t.numel * 4 for t in Checkpoint(folder).tensors.values())


@pytest.mark.parametrize("default", [DEFAULT_TOKENS, PRUNE_TOKENS])
@pytest.mark.parametrize("blocks", [0, 3, 20, 40])
def test_default_fits_the_memory_beside_the_weights(tmp_path, blocks, default):
    folder = saved_checkpoint("mixtral", tmp_path / "src")
    layout = describe(Checkpoint(folder))
    per = per_token_bytes(layout, 2, 4, False)
    budget = _weights(folder) + blocks * 1024 * per + per // 2
    got = calibration_tokens(folder, layout, n_drop=2, dtype="float32", max_memory=budget,
                             default=default)
    assert got.per_token == per
    assert got.tokens == min(default, max(MIN_TOKENS, blocks * 1024))
    assert (got.note() is None) == (got.tokens == default)
    if got.note():
        assert f"not the default {default}:" in got.note()
    explicit = calibration_tokens(folder, layout, n_drop=2, dtype="float32",
                                  max_memory=budget, requested=32768)
    assert explicit.tokens == 32768  # never lowered


def test_estimate_follows_the_cached_experts(tmp_path):
    """M = k + n_drop cached outputs per token where the ranking is stable; every expert under
    grouped routing, and then N x M x H outputs instead of Gram matrices beyond 64."""
    mixtral = describe(Checkpoint(saved_checkpoint("mixtral", tmp_path / "m")))
    grouped = describe(Checkpoint(saved_checkpoint("deepseek_v3", tmp_path / "d")))
    hidden = int(mixtral.config["hidden_size"])
    assert per_token_bytes(mixtral, 3, 2, False) - per_token_bytes(mixtral, 2, 2, False) == \
        8 * ((mixtral.top_k() + 3) ** 2 - (mixtral.top_k() + 2) ** 2) + 16
    assert per_token_bytes(grouped, 1, 2, True) == per_token_bytes(grouped, 2, 2, True)
    import moekit.layerfit.tokens as tokens

    wide = per_token_bytes(mixtral, 2, 2, False)
    found = tokens.gram_fits
    tokens.gram_fits = lambda m, hidden: False
    try:
        m = mixtral.top_k() + 2
        assert per_token_bytes(mixtral, 2, 2, False) - wide == m * hidden * 2 - 8 * m * m - 16 * m
    finally:
        tokens.gram_fits = found


def test_calibrated_prune_uses_the_lowered_default(tmp_path, monkeypatch):
    """No --max-tokens and a budget that leaves room for 3 x 1024 positions beside the weights,
    one experts call and the reconstruction's fixed memory: the run records 3072 (the test's
    DataOptions pass max_tokens=1024; here the default is asked for)."""
    import moekit.ops.prune.calibrated as calibrated

    folder = saved_checkpoint("mixtral", tmp_path / "src")
    layout = describe(Checkpoint(folder))
    per = per_token_bytes(layout, 2, 4, False)
    seen = {}
    original = calibrated.DataOptions

    def options(*args, **kwargs):
        kwargs.update(max_tokens=None,
                      run=_cpu(_weights(folder) + _call(layout) + reconstruct_bytes(layout, 2)
                               + 3 * 1024 * per + 1))
        made = original(*args, **kwargs)
        seen["options"] = made
        return made

    monkeypatch.setattr("support.DataOptions", options)
    choice = choose(folder, doc_corpus(tmp_path), 0.25, compensate=True)
    assert choice.info["max_tokens"] == 3072
    assert seen["options"].max_tokens is None  # resolved into a new record, not written back


def test_merge_cli_uses_the_lowered_default_and_keeps_an_explicit_count(tiny_checkpoint,
                                                                        tmp_path):
    import json

    source = tiny_checkpoint("mixtral")
    layout = describe(Checkpoint(source))
    n_drop = layout.moe_layers[0].num_experts // 2
    budget = _weights(source) + 3 * 1024 * per_token_bytes(layout, n_drop, 4, False) + 1
    stats = stats_for(tmp_path, source)
    for extra, want in (((), 3072), (("--max-tokens", "512"), 512)):
        plan = tmp_path / f"plan{want}.json"
        result = run("merge", source, "--stats", stats, "--ratio", "0.5", "--group", "m-smoe",
                     "--method", "average", "--max-memory", budget, "--dry-run",
                     "--plan-out", plan, *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(plan.read_text())["calibration"]["max_tokens"] == want
        assert ("not the default 16384" in result.output) == (want == 3072)


def test_prune_resolves_its_own_default(tmp_path):
    """`prune --data` without --max-tokens takes PRUNE_TOKENS where the memory allows, and says
    so in one line (naming that default) where it does not."""
    from moekit.ops.prune.calibrated import DataOptions, _resolve_tokens

    folder = saved_checkpoint("mixtral", tmp_path / "src")
    layout = describe(Checkpoint(folder))
    said: list[str] = []
    roomy = DataOptions(run=_cpu(1 << 40))
    roomy = _resolve_tokens(folder, layout, 0.5, roomy, said.append)
    assert roomy.max_tokens == PRUNE_TOKENS > DEFAULT_TOKENS and said == []
    from moekit.surgery.plan import drop_count

    per = per_token_bytes(layout, drop_count(0.5, layout.moe_layers[0].num_experts), 4, False)
    tight = DataOptions(run=_cpu(_weights(folder) + _call(layout) + 20 * 1024 * per + per // 2
                                 + reconstruct_bytes(layout, drop_count(0.5, 8))))
    tight = _resolve_tokens(folder, layout, 0.5, tight, said.append)
    assert tight.max_tokens == 20 * 1024
    assert len(said) == 1 and f"not the default {PRUNE_TOKENS}:" in said[0]


def test_refit_sums_estimate_is_what_the_sums_hold(tmp_path):
    """`refit_sum_bytes` minus the chunk equals the bytes of the fit and held-out RefitStats
    once every kept expert and every co-routed pair has been seen."""
    import itertools

    import torch

    from moekit.layerfit.refit_stats import RefitStats
    from moekit.layerfit.refit_stream import REFIT_BYTES
    from moekit.layerfit.tokens import refit_sum_bytes
    from moekit.surgery.plan import drop_count

    layout = describe(Checkpoint(saved_checkpoint("mixtral", tmp_path / "m")))
    experts = layout.moe_layers[0].num_experts
    n_drop = drop_count(0.5, experts)
    keep = list(range(experts - n_drop))
    hidden, width = int(layout.config["hidden_size"]), int(layout.config["intermediate_size"])
    ids = torch.tensor(list(itertools.permutations(keep, 2)))
    held = 0
    for _ in ("fit", "held-out"):
        sums = RefitStats(keep)
        sums.add(ids, torch.rand(ids.shape), torch.randn(*ids.shape, width),
                 torch.randn(ids.shape[0], hidden))
        held += sum(t.numel() * t.element_size() for store in (sums.gram, sums.cross,
                                                                 sums.pairs)
                    for t in store.values())
    assert held == refit_sum_bytes(layout, n_drop) - REFIT_BYTES


def test_refit_tokens_memory_comes_first_or_is_refused(tmp_path):
    """With --refit-tokens the sums are taken from the memory before the default token count
    is chosen; where they leave less than MIN_TOKENS positions, the run is refused at once."""
    from moekit.errors import InvalidArgumentError
    from moekit.layerfit.tokens import refit_sum_bytes
    from moekit.ops.prune.calibrated import DataOptions, _resolve_tokens
    from moekit.surgery.plan import drop_count

    folder = saved_checkpoint("mixtral", tmp_path / "src")
    layout = describe(Checkpoint(folder))
    n_drop = drop_count(0.5, layout.moe_layers[0].num_experts)
    per, sums = per_token_bytes(layout, n_drop, 4, False), refit_sum_bytes(layout, n_drop)
    fixed = sums + _call(layout)
    budget = _weights(folder) + fixed + 20 * 1024 * per + per // 2
    said: list[str] = []
    plain = DataOptions(reconstruct_steps=0, run=_cpu(budget))
    plain = _resolve_tokens(folder, layout, 0.5, plain, said.append)
    refit = DataOptions(reconstruct_steps=0, run=_cpu(budget), refit_tokens=131072)
    refit = _resolve_tokens(folder, layout, 0.5, refit, said.append)
    assert refit.max_tokens == 20 * 1024 < plain.max_tokens
    from moekit.units import human

    assert f"plus {human(fixed)} whatever the count" in said[-1]
    short = DataOptions(reconstruct_steps=0, refit_tokens=131072,
                        run=_cpu(_weights(folder) + fixed + MIN_TOKENS * per - 1))
    with pytest.raises(InvalidArgumentError, match="--refit-tokens 131072: its sums"):
        short = _resolve_tokens(folder, layout, 0.5, short, said.append)
    explicit = DataOptions(reconstruct_steps=0, run=short.run, max_tokens=4096)
    explicit = _resolve_tokens(folder, layout, 0.5, explicit, said.append)  # no refit: as given
    assert explicit.max_tokens == 4096
    heard = len(said)
    with_refit = DataOptions(reconstruct_steps=0, run=_cpu(budget), max_tokens=4096,
                             refit_tokens=131072)
    with_refit = _resolve_tokens(folder, layout, 0.5, with_refit,
                                 said.append)  # fits: as given, silent
    assert with_refit.max_tokens == 4096 and len(said) == heard


def test_default_refit_streams_more_positions_when_the_memory_allows(tmp_path):
    """The CLI's default (`refit_auto`): REFIT_FACTOR x the selection's positions for the refit
    and the reconstruction where their memory leaves the default selection room; else the
    selection's own positions, said in one line, and the selection keeps its default."""
    from moekit.layerfit.tokens import REFIT_FACTOR, refit_sum_bytes
    from moekit.ops.prune.calibrated import DataOptions, _resolve_tokens
    from moekit.surgery.plan import drop_count

    folder = saved_checkpoint("mixtral", tmp_path / "src")
    layout = describe(Checkpoint(folder))
    said: list[str] = []
    given = DataOptions(run=_cpu(1 << 40), refit_auto=True)
    roomy = _resolve_tokens(folder, layout, 0.5, given, said.append)
    assert roomy.refit_tokens == REFIT_FACTOR * PRUNE_TOKENS and roomy.max_tokens == PRUNE_TOKENS
    assert given == DataOptions(run=_cpu(1 << 40),
                                refit_auto=True)  # the resolved counts are a new record
    assert said == []
    n_drop = drop_count(0.5, layout.moe_layers[0].num_experts)
    per = per_token_bytes(layout, n_drop, 4, False)
    streamed = refit_sum_bytes(layout, n_drop) + reconstruct_bytes(
        layout, n_drop, REFIT_FACTOR * PRUNE_TOKENS)
    budget = _weights(folder) + _call(layout) + PRUNE_TOKENS * per + streamed
    fits = DataOptions(run=_cpu(budget), refit_auto=True)
    fits = _resolve_tokens(folder, layout, 0.5, fits, said.append)
    assert fits.refit_tokens == REFIT_FACTOR * PRUNE_TOKENS and said == []
    short = DataOptions(run=_cpu(budget - per), refit_auto=True)
    short = _resolve_tokens(folder, layout, 0.5, short, said.append)
    assert short.refit_tokens is None and short.max_tokens == PRUNE_TOKENS
    assert len(said) == 1 and "selection's positions only" in said[0]
