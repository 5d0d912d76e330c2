"""Calibration windows spread over the data range (`measured.spread_windows`,
`load_calibration(spread=...)`): the sample equals an independent even spacing of the full
window list, covers the whole range, keeps fit and held-out windows apart, and reads no more
than `spread` times the needed tokens."""

from __future__ import annotations

import pytest
import torch
from support import doc_corpus, saved_checkpoint
from tiny_models import tokenizer

from moekit.calib.data import load_domains
from moekit.calib.spec import DataSpec
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.layerfit.measured import load_calibration, spread_windows
from moekit.runtime.options import RunOptions


@pytest.mark.parametrize(("total", "need"), [(10, 3), (100, 7), (64, 64), (5, 9), (33, 32)])
def test_spread_windows_are_evenly_spaced(total, need):
    windows = [torch.tensor([i, i]) for i in range(total)]
    picked = [int(w[0]) for w in spread_windows(windows, need)]
    if total <= need:
        assert picked == list(range(total))
        return
    # independent: centres of `need` equal bins of [0, total)
    edges = torch.linspace(0, total, need + 1, dtype=torch.float64)
    centres = ((edges[:-1] + edges[1:]) / 2).floor().long().tolist()
    assert picked == centres
    assert len(set(picked)) == need and picked == sorted(picked)
    assert picked[0] < total / need and picked[-1] >= total - total / need


def test_load_calibration_spreads_fit_and_held_windows(tmp_path):
    folder = saved_checkpoint("mixtral", tmp_path / "src")
    source = doc_corpus(tmp_path)
    layout = describe(Checkpoint(folder))
    seq_len, max_tokens, spread = 32, 256, 4
    data, run = DataSpec((source,), seq_len=seq_len), RunOptions(device="cpu", dtype="float32")
    cal = load_calibration(folder, layout, data, max_tokens=max_tokens, run=run, spread=spread)
    plain = load_calibration(folder, layout, data, max_tokens=max_tokens, run=run)
    per_source = max(2 * seq_len, int(max_tokens / 0.8) + seq_len)
    need = -(-per_source // seq_len)
    every = load_domains([source], tokenizer(), seq_len=seq_len,
                         max_tokens=per_source * spread)[0].windows
    assert len(every) > need  # the corpus is long enough for spreading to matter
    step = len(every) / need
    expected = [every[int((i + 0.5) * step)] for i in range(need)]
    cut = int(round(need * 0.8))
    assert 0 < len(cal.fit) <= cut and len(cal.held) == need - cut
    assert all(torch.equal(w[0], e) for w, e in zip(cal.fit, expected[:cut], strict=False))
    assert all(torch.equal(w[0], e) for w, e in zip(cal.held, expected[cut:], strict=True))
    assert torch.equal(cal.held[-1][0], every[int((need - 0.5) * step)])  # near the end
    assert int((need - 0.5) * step) >= len(every) - step
    assert [w.shape for w in cal.fit] == [w.shape for w in plain.fit]
    # without spreading: the leading windows, as before
    first = load_domains([source], tokenizer(), seq_len=seq_len, max_tokens=per_source)[0]
    assert all(torch.equal(a[0], b) for a, b in zip(plain.fit, first.windows, strict=False))
