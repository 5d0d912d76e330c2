"""Routing statistics: the profile record and its files, expert statistics as prune and merge
read them, importance criteria, metrics, uncertainty, plots and reports.

    profile.py       the Profile record          profile_io.py  build, save, load, merge profiles
    expert_stats.py  ExpertStats (the stats contract of `prune`/`merge`)
    criteria.py      criterion_scores, super_experts
    metrics.py, uncertainty.py, ablation.py, plots.py, report.py, html.py
    serving.py       expert placement for serving engines (export)
    serving_import.py  expert load recorded by serving engines (import)

Imports `io/`, `families/`, `calib/` (and `errors`, `units`), never `runtime/`.
"""
