"""pytest plugin for `benchmarks/cuda_check.sh`: append every failed test's id to the file named
by $FAILED_LOG the moment it fails (under xdist on the controller, as reports arrive), so a run
stopped by its time limit - even killed - still names its failures.

    FAILED_LOG=logs/failed.txt PYTHONPATH=benchmarks pytest -p pytest_failures_log tests
"""

from __future__ import annotations

import os
from typing import Any


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get("FAILED_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # controller only
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{report.nodeid} ({report.when})\n")
