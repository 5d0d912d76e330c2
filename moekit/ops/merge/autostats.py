"""Routing statistics for a merge given calibration data but no `--stats` folder.

The grouping needs per-expert usage (centres, usage weights, super experts). Without a profile
folder they are recorded on the calibration data itself: one `profile` pass (the same hooks,
tokens, device, dtype and memory budget as the calibration), written to a temporary folder that
lives as long as the merge.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.spec import DataSpec
from moekit.layerfit.tokens import DEFAULT_TOKENS
from moekit.ops.profile import profile_model
from moekit.runtime.options import RunOptions
from moekit.stats.profile_io import save_profile

if TYPE_CHECKING:
    from moekit.ops.merge.run import Calibration


@contextmanager
def stats_from_calibration(calib: Calibration,
                           log: Callable[[str], Any] | None = None) -> Iterator[Path]:
    """Yield a stats folder recorded on `calib`'s sources (its token budget split evenly
    over them, at most `stats_tokens`, else `max_tokens`, in all); deleted on exit."""
    opts = calib.options
    total = calib.stats_tokens or opts.get("max_tokens") or DEFAULT_TOKENS
    per_source = total // max(len(calib.sources), 1)
    if log is not None:
        log(f"no --stats: recording routing statistics on the calibration data "
            f"({per_source} tokens per source, one forward pass)")
    data = DataSpec(tuple(calib.sources), opts.get("fraction", (0.0, 1.0)),
                    opts.get("text_field", "text"), opts.get("tokenizer"),
                    opts.get("seq_len", 512), total)
    run = RunOptions(opts.get("device", "auto"), opts.get("dtype", "auto"),
                     opts.get("max_memory", "auto"), opts.get("trust_remote_code", False))
    profile = profile_model(calib.source, data, run=run, batch_size=opts.get("batch_size", 4))
    with tempfile.TemporaryDirectory(prefix="moekit-merge-stats-") as folder:
        save_profile(profile, Path(folder))
        yield Path(folder)
