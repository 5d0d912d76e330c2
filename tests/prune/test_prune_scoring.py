"""Held-out scoring of calibrated candidates (`lanes.held_out_kl`): recomputing the logits from
the last-layer outputs, a few positions at a time, gives the KL and top-1 agreement of the full
next-token distributions (the computation it replaced, which kept every reference log-prob)."""

from __future__ import annotations

import pytest
import torch
from support import choose, doc_corpus, in_memory_logits, saved_checkpoint

from moekit.calib.spec import DataSpec
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.layerfit.lanes import held_out_kl
from moekit.layerfit.measured import load_calibration
from moekit.runtime.engine import open_model
from moekit.runtime.loading import load_model
from moekit.runtime.options import RunOptions


def _full_vocab(ref_logits: torch.Tensor, logits: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[float, float, int]:
    """The former scoring: whole [B, S - 1, V] log-probabilities at once (float32)."""
    ref = torch.log_softmax(ref_logits[:, :-1].to(dtype), dim=-1)
    logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    return (float((ref.exp() * (ref - logp)).sum()),
            float((ref.argmax(-1) == logp.argmax(-1)).sum()), ref.shape[0] * ref.shape[1])


def _finals(engine, ids: torch.Tensor) -> torch.Tensor:
    return next(iter(engine.run([ids], head=True, final=True)))[1]


@pytest.mark.parametrize("rows", [1, 7, None])
def test_chunked_kl_equals_full_vocabulary(tmp_path, rows):
    folder = saved_checkpoint("mixtral", tmp_path / "src")
    engine = open_model(folder, device="cpu", dtype="float32", max_memory=None)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    final = _finals(engine, ids)
    gen = torch.Generator().manual_seed(2)
    other = final + 0.01 * torch.randn(final.shape, generator=gen)
    model = load_model(folder, "cpu", "float32")
    with torch.no_grad():
        assert torch.allclose(engine.logits(ids, final), model(ids).logits, atol=1e-5)
    kl, agree, count = held_out_kl(engine, ids, final, other, rows=rows)
    want = _full_vocab(engine.logits(ids, final), engine.logits(ids, other))
    assert count == want[2] == 39
    assert kl == pytest.approx(want[0], rel=1e-5)
    exact = _full_vocab(engine.logits(ids, final), engine.logits(ids, other), torch.float64)
    assert kl == pytest.approx(exact[0], rel=1e-4)
    assert agree == want[1] and 0 < agree < count  # the noise changes some top-1 choices
    assert held_out_kl(engine, ids, final, final, rows=rows)[:2] == (pytest.approx(0, abs=1e-5),
                                                                      count)


@pytest.mark.parametrize("stream", [False, True])
def test_candidate_scores_equal_the_full_vocabulary_kl_of_the_pruned_model(tmp_path, stream):
    """Every candidate's held-out KL and top-1 equal those computed independently: the unpruned
    model and the candidate applied as hooks (`in_memory_logits`), on the held-out windows."""
    folder = saved_checkpoint("mixtral", tmp_path / "src")
    source = doc_corpus(tmp_path)
    choice = choose(folder, source, 0.25, stream=stream, compensate=None)
    layout = describe(Checkpoint(folder))
    cal = load_calibration(folder, layout, DataSpec((source,), seq_len=64), max_tokens=1024,
                           run=RunOptions(device="cpu", dtype="float32", max_memory=None))
    assert cal.held
    model = load_model(folder, "cpu", "float32")
    assert len(choice.candidates) == 3  # with and without the refits, down refits only
    for candidate in choice.candidates:
        kl = agree = count = 0.0
        for ids in cal.held:
            with torch.no_grad():
                want = _full_vocab(model(ids).logits, in_memory_logits(folder, candidate, ids))
            kl, agree, count = kl + want[0], agree + want[1], count + want[2]
        assert candidate.kl == pytest.approx(kl / count, rel=1e-4, abs=1e-7)
        assert candidate.top1 == pytest.approx(agree / count, abs=1.01 / count)
