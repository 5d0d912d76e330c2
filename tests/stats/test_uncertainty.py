"""Bootstrap intervals over calibration windows: coverage by simulation, pruning stability,
"dead" only when the interval allows it, per-window counts recorded, saved and merged."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_profile import synthetic_profile
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.stats.profile_io import load_profile, load_trace, merge_profiles, save_profile
from moekit.stats.uncertainty import layer_uncertainty, profile_uncertainty, zero_count_upper

E, K, N = 8, 2, 64  # experts, top-k, tokens per window
TRUE = np.linspace(1.0, 4.0, E) / np.linspace(1.0, 4.0, E).sum()


def windows(rng, num_windows, rates=TRUE, dispersion=None):
    """[W, E] slot counts: K*N slots per window ~ Multinomial(rates); with `dispersion`, each
    window's rates ~ Dirichlet(dispersion * rates) (topic drift between windows)."""
    if dispersion is None:
        return rng.multinomial(N * K, rates, size=num_windows)
    return np.stack([rng.multinomial(N * K, rng.dirichlet(dispersion * rates))
                     for _ in range(num_windows)])


@pytest.mark.parametrize(("num_windows", "dispersion"), [(12, None), (40, None), (40, 30.0)])
def test_intervals_cover_the_true_share_95_percent(num_windows, dispersion):
    """R repetitions x E experts intervals; coverage within 3 binomial sd of 0.95."""
    rng, reps, hits = np.random.default_rng(7), 150, []
    for r in range(reps):
        counts = windows(rng, num_windows, dispersion=dispersion)
        table, _ = layer_uncertainty(counts, counts * 0.5, ratio=0.25, replicates=400, seed=r)
        hits.append((table["share_lo"] <= TRUE) & (TRUE <= table["share_hi"]))
    coverage, n = float(np.mean(hits)), reps * E
    assert abs(coverage - 0.95) < 3 * np.sqrt(0.95 * 0.05 / n), coverage


def test_naive_token_level_intervals_would_fail_under_drift():
    """The check has teeth: a binomial interval that treats tokens as independent undercovers
    when windows drift (so window resampling is what makes the test pass)."""
    rng, hits = np.random.default_rng(3), []
    for _ in range(150):
        counts = windows(rng, 40, dispersion=30.0).sum(axis=0)
        share, n = counts / counts.sum(), counts.sum()
        half = 1.96 * np.sqrt(share * (1 - share) / n)
        hits.append((share - half <= TRUE) & (TRUE <= share + half))
    assert float(np.mean(hits)) < 0.85


def test_drop_frequency_and_stability():
    """Clear gaps give stable decisions; a near-tie at the cut is flagged unstable and asks for
    more tokens; results are identical for equal seeds."""
    rates = np.array([0.02, 0.03, 0.10, 0.1001, 0.15, 0.2, 0.2, 0.1999])
    rng = np.random.default_rng(0)
    counts = windows(rng, 30, rates=rates / rates.sum())
    table, growth = layer_uncertainty(counts, counts * 1.0, ratio=0.25, seed=1)
    assert table.loc[[0, 1], "drop_freq"].min() > 0.95 and table.loc[[0, 1], "dropped"].all()
    assert table.loc[4:, "drop_freq"].max() < 0.05 and not table["unstable"][4:].any()
    assert not table["unstable"].any() and growth == 1.0
    near_tie, growth3 = layer_uncertainty(counts, counts * 1.0, ratio=3 / 8, seed=1)
    assert near_tie.loc[[2, 3], "unstable"].all()      # 0.10 vs 0.1001 at the cut
    assert growth3 > 4.0                 # a 0.1% gap needs far more than 4x the tokens
    again, _ = layer_uncertainty(counts, counts * 1.0, ratio=0.25, seed=1)
    assert again.equals(table)


def test_dead_only_when_the_upper_bound_allows():
    rates = np.r_[np.zeros(1), np.full(E - 1, 1.0 / (E - 1))]
    few = np.random.default_rng(0).multinomial(K * 16, rates, size=4)     # 128 slots in all
    many = np.random.default_rng(0).multinomial(K * N, rates, size=60)    # 7680 slots
    small, _ = layer_uncertainty(few, few * 1.0, ratio=0.25)
    large, _ = layer_uncertainty(many, many * 1.0, ratio=0.25)
    assert small.loc[0, "unseen"] and not small.loc[0, "dead"]
    assert large.loc[0, "dead"] and not large["dead"][1:].any()
    upper = zero_count_upper(7680, 0.95)
    assert abs(upper - 3.689 / 7680) < 1e-5 and large.loc[0, "share_upper"] == upper


def test_windows_are_saved_merged_and_bootstrapped(tmp_path):
    a, ids_a = synthetic_profile([TRUE, TRUE[::-1]], K, 640, seed=1, window=N)
    b, ids_b = synthetic_profile([TRUE, TRUE[::-1]], K, 320, seed=2, window=N)
    b.metadata["model_fingerprint"] = a.fingerprint
    for folder, prof in ((tmp_path / "a", a), (tmp_path / "b", b)):
        folder.mkdir()
        save_profile(prof, folder)
    merged = merge_profiles([load_profile(tmp_path / "a"), load_profile(tmp_path / "b")])
    win = merged.windows["a/1/tokens"]
    assert win.shape == (15, E) and win.dtype == np.int32
    expect = np.concatenate([ids_a[1][0], ids_b[1][0]])
    np.testing.assert_array_equal(win.sum(axis=0), np.bincount(expect.ravel(), minlength=E))
    np.testing.assert_array_equal(win[10], np.bincount(ids_b[1][0][:N].ravel(), minlength=E))
    experts, layers = profile_uncertainty(merged, ratio=0.25, seed=5)
    again, _ = profile_uncertainty(merged, ratio=0.25, seed=5)
    assert experts.equals(again) and list(layers["windows"]) == [15, 15]
    assert (experts["share_lo"] <= experts["share"]).all()
    assert (experts["share"] <= experts["share_hi"]).all()


def test_recorder_windows_match_the_trace(tiny_checkpoint, tmp_path):
    """Per-window counts from the hooks equal counts of the trace's ids, window by window."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} and more{i % 13}" for i in range(600)))
    out = tmp_path / "p"
    result = CliRunner().invoke(app, [
        "profile", str(tiny_checkpoint("qwen2_moe")), "--out", str(out), "--data", f"a={text}",
        "--trace", "--seq-len", "32", "--max-tokens", "300", "--batch-size", "3",
        "--device", "cpu", "--no-plots"])
    assert result.exit_code == 0, result.output
    profile, trace = load_profile(out), load_trace(out)
    for layer in profile.moe_layers:
        ids = trace[f"a/layer_{layer}/ids"].astype(np.int64)
        chunks = [ids[s:s + 32] for s in range(0, len(ids), 32)]   # windows of --seq-len
        got = profile.windows[f"a/{layer}/tokens"]
        expect = np.stack([np.bincount(c.ravel(), minlength=got.shape[1]) for c in chunks])
        assert len(chunks) >= 9
        np.testing.assert_array_equal(got, expect)
        assert np.allclose(profile.windows[f"a/{layer}/reap_sum"].sum(axis=0),
                           profile.experts(layer, "a")["reap_sum"], rtol=1e-4)


def test_cli_uncertainty_and_report_section(tmp_path):
    rates = np.r_[0.0, np.linspace(1.0, 2.0, E - 1)]
    profile, _ = synthetic_profile([rates, TRUE], K, 1280, window=N)
    folder = tmp_path / "p"
    folder.mkdir()
    save_profile(profile, folder)
    out = tmp_path / "ci.csv"
    result = CliRunner().invoke(app, ["stats", "uncertainty", str(folder), "--ratio", "0.5",
                                      "--seed", "3", "--export", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(out)
    expected, _ = profile_uncertainty(load_profile(folder), ratio=0.5, seed=3)
    np.testing.assert_allclose(table["share_hi"], expected["share_hi"])
    assert table.loc[0, "dead"] and table["drop_freq"].between(0, 1).all()
    bad = CliRunner().invoke(app, ["stats", "uncertainty", str(folder), "--criterion", "zz"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    from moekit.stats.report import findings
    assert "1 dead (no token; the 95% bound allows it)" in findings(profile)[0]


def test_estimated_token_growth_settles_the_decisions():
    """Fresh data of (estimated growth x) the windows makes unstable decisions stable in most
    cases (the estimate rests on the observed gap, itself noisy)."""
    rates = np.array([0.02, 0.03, 0.10, 0.112, 0.15, 0.2, 0.2, 0.188])
    rates = rates / rates.sum()
    settled, cases = 0, 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(128, rates, size=20)
        table, growth = layer_uncertainty(counts, counts * 1.0, ratio=3 / 8, seed=seed,
                                          replicates=500)
        if not table["unstable"].any():
            continue
        more = rng.multinomial(128, rates, size=int(np.ceil(20 * min(growth, 200.0))))
        after, _ = layer_uncertainty(more, more * 1.0, ratio=3 / 8, seed=seed, replicates=500)
        cases, settled = cases + 1, settled + int(not after["unstable"].any())
    assert cases >= 5 and settled >= cases - 2, (settled, cases)


@pytest.mark.parametrize(("df", "expected"), [(3, 3.182446), (9, 2.262157), (39, 2.022691),
                                              (1000, 1.962339)])
def test_student_t_quantile_matches_tables(df, expected):
    from moekit.stats.uncertainty import student_t_quantile

    assert abs(student_t_quantile(0.975, df) - expected) < (5e-3 if df < 5 else 1e-4)


def test_layer_table_says_dead_only_when_the_upper_bound_allows():
    """The per-layer table (terminal, --export) applies the same rule as the findings:
    an expert with no token is `dead` with enough slots, `unseen` with too few."""
    from moekit.stats.metrics import summary_table
    from moekit.stats.report import findings

    rates = np.r_[0.0, np.full(E - 1, 1.0 / (E - 1))]
    few, _ = synthetic_profile([rates], K, 48)          # 96 slots: bound 3.8% > 5% of 1/8
    many, _ = synthetic_profile([rates], K, 4000)       # 8000 slots: bound 0.05% < 0.625%
    small, large = summary_table(few).iloc[0], summary_table(many).iloc[0]
    assert (small["dead_experts"], small["unseen_experts"]) == (0, 1)
    assert (large["dead_experts"], large["unseen_experts"]) == (1, 0)
    assert "0 dead" in findings(few)[0] and "1 unseen" in findings(few)[0]
    assert "1 dead" in findings(many)[0] and "unseen" not in findings(many)[0]
