"""Issue 24, remaining items: container memory limits, bounded reading of whitespace-free text,
full temp folders, context length and torchrun refusals, plan and tokenizer checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from moekit.runtime import budget
from moekit.runtime.budget import Sizes, decide


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, room", [
    ({"memory.max": "1000000\n", "memory.current": "400000\n",
      "memory.stat": "anon 300000\ninactive_file 100000\n"}, 700000),
    ({"memory/memory.limit_in_bytes": "2000000\n", "memory/memory.usage_in_bytes": "500000\n"},
     1500000),
])
def test_auto_memory_respects_a_cgroup_limit(tmp_path, monkeypatch, files, room):
    """`--max-memory auto` in a container: the cgroup's room, not the host's free RAM."""
    monkeypatch.setattr(budget, "CGROUP_ROOT", _cgroup(tmp_path, files), raising=False)
    assert budget.free_memory("cpu") == room
    sizes = Sizes(total=3 * room, resident=100, layers=(room, room), bases=(60, 60),
                  expert=(30, 30))
    plan = decide(sizes, "auto", "cpu")
    assert plan.mode == "stream" and "cgroup limit" in plan.reason
    assert plan.budget == int(0.8 * room)


@pytest.mark.parametrize("files", [
    {"memory.max": "max\n", "memory.current": "5\n"},
    {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, {}])
def test_no_cgroup_limit_leaves_the_host_figure(tmp_path, monkeypatch, files):
    monkeypatch.setattr(budget, "CGROUP_ROOT", _cgroup(tmp_path, files), raising=False)
    assert budget.cgroup_room() is None
    assert budget.free_memory("cpu") == budget.host_available()
