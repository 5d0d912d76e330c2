"""Profile the trained fixture mixtral-e16k2 on its five text domains (skipped without
../shared/fixtures): the routers specialise, and the report and plots show it."""

from __future__ import annotations

import itertools

import numpy as np
from conftest import fixture_path

from moekit.calib.data import DataSource
from moekit.ops.profile import profile_model, write_output
from moekit.stats.metrics import specialisation

DOMAINS = ("code_py", "de", "en_bible", "en_docs", "fr")


def test_fixture_domains_specialise(tmp_path):
    model = fixture_path("models", "mixtral-e16k2")
    texts = fixture_path("text")
    sources = [DataSource(name, texts / f"{name}.txt") for name in DOMAINS]
    profile = profile_model(model, sources, seq_len=256, max_tokens=1024, batch_size=4,
                            device="cpu", dtype="float32", fraction=(0.0, 0.5))
    spec = specialisation(profile)
    last = profile.moe_layers[-1]
    loads = {d: spec[(spec["layer"] == last) & (spec["domain"] == d)].sort_values("expert")[
        "tokens"].to_numpy(float) for d in DOMAINS}
    shares = {d: v / v.sum() for d, v in loads.items()}
    distance = np.mean([0.5 * np.abs(shares[a] - shares[b]).sum()
                        for a, b in itertools.combinations(DOMAINS, 2)])
    assert distance > 0.3, f"domains route alike in layer {last} (mean TV {distance:.2f})"
    for domain in DOMAINS:
        assert spec[spec["domain"] == domain]["relative"].max() > 2.5, domain
    names = write_output(profile, tmp_path / "out", plots=True)
    assert {"specialisation.png", "usage_heatmap.png", "report.md"} <= set(names)
    report = (tmp_path / "out" / "report.md").read_text()
    assert all(f"`{d}` most prefers" in report for d in DOMAINS)
