"""Profile a small Mixtral trained in the test session on the three sample_data/ domains
(tests/tiny_models.py TRAINED): its routers specialise by domain, an untrained copy's do not,
and the report and plots show it."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from moekit.calib.data import DataSource
from moekit.calib.spec import DataSpec
from moekit.ops.profile import profile_model, write_output
from moekit.runtime.options import RunOptions
from moekit.stats.metrics import specialisation


def domain_spread(model: Path, texts: dict[str, Path]) -> tuple[float, object, object]:
    """Mean total-variation distance between the domains' expert shares in the last MoE layer
    (0 = every domain routes alike, 1 = disjoint experts), the specialisation table, profile."""
    sources = [DataSource(name, path) for name, path in texts.items()]
    data = DataSpec(tuple(sources), (0.0, 0.5), seq_len=64, max_tokens=1024)
    profile = profile_model(model, data, run=RunOptions(device="cpu", dtype="float32"),
                            batch_size=4)
    spec = specialisation(profile)
    last = profile.moe_layers[-1]
    loads = {d: spec[(spec["layer"] == last) & (spec["domain"] == d)].sort_values("expert")[
        "tokens"].to_numpy(float) for d in texts}
    shares = {d: v / v.sum() for d, v in loads.items()}
    distance = np.mean([0.5 * np.abs(shares[a] - shares[b]).sum()
                        for a, b in itertools.combinations(texts, 2)])
    return float(distance), spec, profile


def test_trained_domains_specialise(trained_checkpoint, tiny_checkpoint, sample_texts, tmp_path):
    trained = trained_checkpoint("moe")
    distance, spec, profile = domain_spread(trained, sample_texts)
    untrained, _, _ = domain_spread(tiny_checkpoint("mixtral"), sample_texts)
    assert distance > 0.25, f"domains route alike (mean TV {distance:.2f})"
    assert distance > 2 * untrained, (distance, untrained)
    for domain in sample_texts:
        assert spec[spec["domain"] == domain]["relative"].max() > 2.5, domain
    names = write_output(profile, tmp_path / "out", plots=True)
    assert {"specialisation.png", "usage_heatmap.png", "report.md"} <= set(names)
    report = (tmp_path / "out" / "report.md").read_text()
    assert all(f"`{d}` most prefers" in report for d in sample_texts)
