"""`moekit eval --tasks`: task benchmarks through lm-evaluation-harness (`lm_eval`), on the
model and, with a reference, on the original, side by side.

Any task lm-eval knows runs, and a user's own YAML task with local data files (`--tasks
./my_task.yaml`, whose folder is added to lm-eval's include path, or `--include-path DIR`), so
it works offline. Each model is loaded by moekit's runtime in memory (quantized checkpoints
decoded on load; a model larger than memory is refused: lm-eval needs the whole model) and
handed to lm-eval's `HFLM` as an instance; the numbers are lm-eval's `simple_evaluate`
results, unchanged. retained = model / reference (for metrics where higher is better).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import InvalidArgumentError, UnsupportedModelError
from moekit.ops.generate import in_memory
from moekit.runtime.loading import load_tokenizer
from moekit.runtime.options import RunOptions


@dataclass
class TaskRow:
    """One (task, metric) of the results: the model's value, the reference's, their stderr."""

    task: str
    metric: str
    model: float
    ref: float | None = None
    stderr: float | None = None
    ref_stderr: float | None = None

    @property
    def delta(self) -> float | None:
        return None if self.ref is None else self.model - self.ref

    @property
    def retained(self) -> float | None:
        return None if not self.ref else self.model / self.ref

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "model": self.model, "ref": self.ref,
                "delta": self.delta, "stderr": self.stderr, "ref_stderr": self.ref_stderr,
                "retained": self.retained}


def task_names(spec: str, include_path: Path | None) -> tuple[list[str], list[str]]:
    """(task names, include folders) from `--tasks a,b,./mine.yaml` and `--include-path`."""
    names, folders = [], [str(include_path)] if include_path is not None else []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            names.append(_yaml_task(path))
            folders.append(str(path.resolve().parent))
        else:
            names.append(item)
    if not names:
        raise InvalidArgumentError("--tasks names no task", "e.g. --tasks hellaswag,arc_easy")
    return names, folders


def _yaml_task(path: Path) -> str:
    import re

    if not path.is_file():
        raise InvalidArgumentError(f"task file {path} does not exist",
                                   "pass a task name lm-eval knows or an existing .yaml")
    match = re.search(r"^task:\s*['\"]?([\w.\-]+)", path.read_text(encoding="utf-8"), re.M)
    if match is None:
        raise InvalidArgumentError(f"{path} has no `task:` name", "add `task: NAME` to it")
    return match[1]


def run_tasks(model: Path, spec: str, ref: Path | None = None, *, limit: int | None = None,
              include_path: Path | None = None, batch_size: int = 4,
              run: RunOptions = RunOptions(), tokenizer: str | None = None) -> list[TaskRow]:
    """lm-eval's results for `model` (and `ref`) on the tasks of `spec`, one row per metric;
    both loaded whole as `run` says (`generate.in_memory`)."""
    names, folders = task_names(spec, include_path)
    lm_eval = _lm_eval()
    manager = lm_eval.tasks.TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise InvalidArgumentError(f"lm-eval knows no task {unknown}",
                                   "check the name, or pass the task's .yaml / --include-path")
    ours = _evaluate(lm_eval, manager, model, names, limit, batch_size, run, tokenizer)
    theirs = (_evaluate(lm_eval, manager, ref, names, limit, batch_size, run, tokenizer)
              if ref is not None else None)
    return rows(ours, theirs)


def rows(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]] | None
         ) -> list[TaskRow]:
    """TaskRows from lm-eval's `results` dicts (`"acc,none": 0.5, "acc_stderr,none": 0.1`)."""
    out = []
    for task, values in ours.items():
        for key, value in values.items():
            metric, _, _ = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or \
                    metric in ("sample_len",):
                continue
            other = (theirs or {}).get(task, {})
            out.append(TaskRow(task, key, float(value), _float(other.get(key)),
                               _float(values.get(key.replace(",", "_stderr,", 1))),
                               _float(other.get(key.replace(",", "_stderr,", 1)))))
    return out


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as err:
        raise UnsupportedModelError("--tasks runs lm-evaluation-harness, which is not installed",
                                    "pip install 'moekit[tasks]'") from err
    return lm_eval


def _evaluate(lm_eval: Any, manager: Any, path: Path, names: list[str], limit: int | None,
              batch_size: int, run: RunOptions, tokenizer: str | None
              ) -> dict[str, dict[str, Any]]:
    loaded = in_memory(path, run, "--tasks")
    tok = load_tokenizer(path, tokenizer, run.trust_remote_code)
    model = lm_eval.models.huggingface.HFLM(pretrained=loaded.model, tokenizer=tok,
                                            batch_size=batch_size, device=str(loaded.device))
    result = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager,
                                     limit=limit, log_samples=False, verbosity="ERROR")
    return dict(result["results"]) if result else {}
