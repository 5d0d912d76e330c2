"""Plans: criteria against an independent pandas computation, rounding, protection, groups,
lists, JSON round trip and validation."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from moekit.errors import InvalidArgumentError, StatsError
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.prune.select import build_plan, parse_protect, read_expert_lists
from moekit.stats.expert_stats import check_stats, load_stats, write_stats
from moekit.surgery.plan import PrunePlan, budget_rows, drop_count, validate_plan

COLUMNS = {"frequency": "tokens", "weight": "weight_sum", "ean": "ean_sum",
           "reap-sum": "reap_sum"}


def _model(tiny_checkpoint, model_type="mixtral"):
    checkpoint = Checkpoint(tiny_checkpoint(model_type))
    layout = describe(checkpoint)
    return layout, model_fingerprint(checkpoint, layout)


def _rows(layout, seed: int = 0) -> list[dict]:
    """Pseudo-random sums for two domains; expert 3 of every layer has no tokens."""
    import random

    rng = random.Random(seed)
    rows = []
    for layer in layout.moe_layers:
        for j in range(layer.num_experts):
            for domain in ("all", "code"):
                t = 0 if j == 3 else rng.randint(1, 500)
                rows.append(dict(layer=layer.index, expert=j, domain=domain, tokens=t,
                                 weight_sum=t * rng.random(), ean_sum=t * rng.uniform(1, 3),
                                 reap_sum=t * rng.random(), max_norm=rng.random()))
    return rows


def _stats(tmp_path, layout, fingerprint, rows=None):
    meta = dict(model_fingerprint=fingerprint, moe_layers=[x.index for x in layout.moe_layers],
                num_experts=layout.moe_layers[0].num_experts, top_k=layout.top_k(),
                family=layout.family.name, domains=["all", "code"])
    return write_stats(tmp_path / "stats", rows or _rows(layout), meta)


@pytest.mark.parametrize("criterion", ["frequency", "weight", "ean", "reap-sum", "reap"])
@pytest.mark.parametrize("domain", ["all", "code"])
def test_criteria_match_pandas(criterion, domain, tiny_checkpoint, tmp_path):
    layout, fingerprint = _model(tiny_checkpoint)
    folder = _stats(tmp_path, layout, fingerprint)
    stats = load_stats(folder, domain)
    check_stats(stats, layout, fingerprint)
    plan = build_plan(layout, fingerprint, criterion=criterion, ratio=0.375, stats=stats)
    frame = pd.read_parquet(folder / "expert_stats.parquet")
    frame = frame[frame.domain == domain]
    for p in plan.layers:
        part = frame[frame.layer == p.layer].sort_values("expert")
        if criterion == "reap":
            score = (part.reap_sum / part.tokens).where(part.tokens > 0, 0.0)
        else:
            score = part[COLUMNS[criterion]]
        assert p.scores == pytest.approx(list(score))
        expected = sorted(part.assign(s=list(score)).sort_values(["s", "expert"]).expert[:3])
        assert p.dropped == expected
        assert p.kept == [j for j in range(8) if j not in expected]
    assert plan.stats_sha256 == stats.sha256 and plan.domain == domain


def test_random_is_seeded_and_drop_count_rounds_half_up(tiny_checkpoint):
    layout, fingerprint = _model(tiny_checkpoint)
    a = build_plan(layout, fingerprint, criterion="random", ratio=0.5, seed=1)
    b = build_plan(layout, fingerprint, criterion="random", ratio=0.5, seed=1)
    c = build_plan(layout, fingerprint, criterion="random", ratio=0.5, seed=2)
    assert [p.kept for p in a.layers] == [p.kept for p in b.layers] != [p.kept for p in c.layers]
    assert [drop_count(r, e) for r, e in [(0.5, 7), (0.25, 6), (0.3, 10), (0.0, 8)]] == [4, 2, 3, 0]


def test_protection_and_floor(tiny_checkpoint, tmp_path):
    layout, fingerprint = _model(tiny_checkpoint)
    stats = load_stats(_stats(tmp_path, layout, fingerprint))
    protect = parse_protect(["*:3", "1:5"], layout)
    assert protect == {0: [3], 1: [3, 5]}
    plan = build_plan(layout, fingerprint, criterion="frequency", ratio=0.5, stats=stats,
                      protect=protect)
    assert 3 in plan.layer(0).kept and {3, 5} <= set(plan.layer(1).kept)
    assert all(len(p.dropped) == 4 for p in plan.layers)
    with pytest.raises(InvalidArgumentError, match="protects 5 experts but only 4"):
        build_plan(layout, fingerprint, criterion="frequency", ratio=0.5, stats=stats,
                   protect={0: [0, 1, 2, 3, 4]})
    with pytest.raises(InvalidArgumentError, match="min-experts 7"):
        build_plan(layout, fingerprint, criterion="random", ratio=0.25, min_experts=7)


def test_grouped_selection(tiny_checkpoint, tmp_path):
    """deepseek_v3 tiny: 8 experts, n_group=2, topk_group=1, top-k 2, sigmoid router."""
    layout, fingerprint = _model(tiny_checkpoint, "deepseek_v3")
    rows = [dict(layer=layer.index, expert=j, domain="all", tokens=float(j), weight_sum=0,
                 ean_sum=0, reap_sum=0, max_norm=0)
            for layer in layout.moe_layers for j in range(8)]
    stats = load_stats(_stats(tmp_path, layout, fingerprint, rows))
    plan = build_plan(layout, fingerprint, criterion="frequency", ratio=0.5, stats=stats)
    assert all(p.dropped == [0, 1, 4, 5] for p in plan.layers)  # 2 lowest of each group
    assert plan.config_changes == {} and plan.warnings == []
    # 6 of 8 would leave 1 per group: sigmoid groups are scored by their top-2 -> fall back
    plan = build_plan(layout, fingerprint, criterion="frequency", ratio=0.75, stats=stats)
    assert all(p.dropped == [0, 1, 2, 3, 4, 5] for p in plan.layers)
    assert plan.config_changes == {"n_group": 1, "topk_group": 1} and plan.warnings


def test_expert_lists(tiny_checkpoint, tmp_path):
    layout, fingerprint = _model(tiny_checkpoint)
    (tmp_path / "keep.txt").write_text("0: 0 1 2 3 4 5\n1: 2,3,4,5,6,7  # comment\n")
    keep = read_expert_lists(tmp_path / "keep.txt", layout, "--keep")
    plan = build_plan(layout, fingerprint, keep=keep)
    assert plan.criterion == "explicit" and plan.ratio == 0.25
    assert [p.dropped for p in plan.layers] == [[6, 7], [0, 1]]
    (tmp_path / "drop.json").write_text(json.dumps({"0": [1], "1": [2, 3]}))
    drop = read_expert_lists(tmp_path / "drop.json", layout, "--drop")
    with pytest.raises(InvalidArgumentError, match="different expert counts"):
        build_plan(layout, fingerprint, drop=drop)
    (tmp_path / "bad.json").write_text(json.dumps({"4": [1]}))
    with pytest.raises(InvalidArgumentError, match="layer 4, which is not a MoE layer"):
        read_expert_lists(tmp_path / "bad.json", layout, "--drop")
    with pytest.raises(InvalidArgumentError, match="--ratio 0.5 removes 4"):
        build_plan(layout, fingerprint, keep=keep, ratio=0.5)


def test_plan_json_round_trip_and_validation(tiny_checkpoint, tmp_path):
    layout, fingerprint = _model(tiny_checkpoint)
    stats = load_stats(_stats(tmp_path, layout, fingerprint))
    plan = build_plan(layout, fingerprint, criterion="reap", ratio=0.25, stats=stats,
                      protect={1: [0]})
    loaded = PrunePlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert validate_plan(loaded, layout, fingerprint) == plan
    with pytest.raises(InvalidArgumentError, match="not this checkpoint"):
        validate_plan(PrunePlan.load(tmp_path / "plan.json"), layout, "0" * 16)
    validate_plan(PrunePlan.load(tmp_path / "plan.json"), layout, "0" * 16,
                  ignore_fingerprint=True)
    broken = PrunePlan.load(tmp_path / "plan.json")
    broken.layers[1].kept, broken.layers[1].dropped = [1, 2, 3, 4, 5, 6, 7], [0]
    with pytest.raises(InvalidArgumentError, match="protected"):
        validate_plan(broken, layout, fingerprint)
    broken.protected = {}
    with pytest.raises(InvalidArgumentError, match="different layers"):
        validate_plan(broken, layout, fingerprint)
    (tmp_path / "junk.json").write_text('{"layers": 3}')
    with pytest.raises(InvalidArgumentError, match="not a moekit prune plan"):
        PrunePlan.load(tmp_path / "junk.json")


def test_budget_rows_are_shares_of_the_stats(tiny_checkpoint, tmp_path):
    layout, fingerprint = _model(tiny_checkpoint)
    rows = _rows(layout)
    stats = load_stats(_stats(tmp_path, layout, fingerprint, rows))
    plan = build_plan(layout, fingerprint, criterion="ean", ratio=0.5, stats=stats)
    frame = pd.DataFrame(rows)
    frame = frame[frame.domain == "all"]
    for row, p in zip(budget_rows(plan, stats), plan.layers, strict=True):
        part = frame[frame.layer == p.layer].set_index("expert")
        for key, column in (("traffic_removed", "tokens"), ("weight_removed", "weight_sum"),
                            ("saliency_removed", "ean_sum")):
            assert row[key] == pytest.approx(part[column][p.dropped].sum() / part[column].sum())
    random_plan = build_plan(layout, fingerprint, criterion="random", ratio=0.5)
    assert all(r["traffic_removed"] != r["traffic_removed"] for r in budget_rows(random_plan,
                                                                                None))


def test_malformed_stats(tiny_checkpoint, tmp_path):
    layout, fingerprint = _model(tiny_checkpoint)
    folder = _stats(tmp_path, layout, fingerprint)
    (folder / "expert_stats.csv").write_text("layer,expert,tokens\n0,0,1\n")
    with pytest.raises(StatsError, match="lacks column"):
        load_stats(folder)
    (folder / "expert_stats.csv").unlink()
    assert load_stats(folder).layers == [0, 1]  # the Parquet copy is read instead
    with pytest.raises(StatsError, match="does not exist"):
        load_stats(tmp_path / "nowhere")
