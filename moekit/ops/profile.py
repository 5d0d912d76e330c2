"""`moekit profile`: run calibration text through a MoE checkpoint and record its routing.

profile_model validates everything cheap first (family, data, tokenizer, the profile to merge
with), then loads the model, attaches the recording hooks (moekit.calib.hooks), runs every
domain's windows in batches, and returns a Profile (moekit.stats.profile_io).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moekit.calib.data
import moekit.runtime.engine
from moekit import __version__
from moekit.calib.data import Domain, batches
from moekit.calib.hooks import RoutingHooks
from moekit.calib.recorder import Recorder
from moekit.calib.spec import DataSpec, per_source
from moekit.errors import InvalidArgumentError, StatsError, UnsupportedModelError
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import ModelLayout, describe
from moekit.io.output import staged_output
from moekit.io.reader import Checkpoint
from moekit.io.remote_code import check_remote_code
from moekit.io.source import resolve_source
from moekit.runtime.distributed import (
    dist_context,
    rank_device,
    reduce_recorder,
    shard_for_rank,
)
from moekit.runtime.engine import forward_routing as forward  # noqa: F401 - benchmarks
from moekit.runtime.engine import mode_line
from moekit.runtime.loading import DTYPES, load_tokenizer, pick_device
from moekit.runtime.options import RunOptions
from moekit.stats.ablation import PLOT_FILE, attach, has_ablation, scatter_plot
from moekit.stats.plots import write_plots
from moekit.stats.profile import Profile
from moekit.stats.profile_io import (
    ALL,
    load_profile,
    merge_profiles,
    profile_from_raw,
    save_profile,
)
from moekit.stats.report import write_report

if TYPE_CHECKING:
    from moekit.calib.recorder import Recorder
    from moekit.runtime.engine import Engine

PROFILE_TOKENS = 100_000  # the default --max-tokens, in total over the sources
Progress = Callable[[str, int, str], None]  # (event "start" | "batch", tokens, domain name)


def profile_model(model: str | Path, data: DataSpec = DataSpec(), *,
                  run: RunOptions = RunOptions(), batch_size: int = 8, trace: bool = False,
                  merge_with: Path | None = None, revision: str | None = None,
                  progress: Progress | None = None, ablation_tokens: int | None = None,
                  ablation_method: str = "exact", **engine: Any) -> Profile:
    """Profile `model` on `data` (`calib.spec.DataSpec`; no sources: sample_data/), one domain
    per source, run as `run` says (`runtime.options.RunOptions`).

    `data.max_tokens` counts in total over the sources, an equal share from each (None:
    PROFILE_TOKENS). With `merge_with`, the result is that profile plus this run
    (same model fingerprint required, checked before any forward pass). The model runs through
    `moekit.runtime` (in memory or streamed under `run.max_memory`; `engine` options go to
    `open_model`); metadata["runtime"] says which mode ran and why. Under torchrun each rank
    runs its share of the batches and the sums are reduced (`moekit.runtime.distributed`).
    Code shipped in the checkpoint runs only with `run.trust_remote_code`. With
    `ablation_tokens`, every expert is also ablated on that many tokens (`moekit.ops.ablation`,
    columns `ablation_*` of expert_stats; in-memory runs only).
    """
    if batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be at least 1, got {batch_size}")
    if run.dtype not in DTYPES:
        raise InvalidArgumentError(f"--dtype {run.dtype} is not one of {', '.join(DTYPES)}")
    device = rank_device(run.device)
    pick_device(device)
    path = resolve_source(model, revision)
    check_remote_code(path, run.trust_remote_code)
    checkpoint = Checkpoint(path)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise UnsupportedModelError(f"{model} is a dense {layout.resolved.family.name} model: "
                                    "it has no router to profile", "pass a MoE checkpoint")
    if ablation_tokens is not None:
        from moekit.ops.ablation.run import check_request

        check_request(layout, ablation_method, ablation_tokens)
    fingerprint = model_fingerprint(checkpoint, layout)
    previous = _previous(merge_with, fingerprint) if merge_with else None
    sources = data.resolved_sources()
    if any(s.name == ALL for s in sources):
        raise InvalidArgumentError(f"a data source is named '{ALL}', which is reserved for totals",
                                   "name it differently: --data NAME=PATH")
    max_tokens = data.total(PROFILE_TOKENS)
    tok = load_tokenizer(path, data.tokenizer, run.trust_remote_code)
    domains = moekit.calib.data.load_domains(sources, tok, seq_len=data.seq_len,
                                             max_tokens=per_source(max_tokens, len(sources)),
                                             text_field=data.text_field, fraction=data.fraction)
    loaded = moekit.runtime.engine.open_model(path, **replace(run, device=device).engine(),
                                              **engine)
    if ablation_tokens is not None:
        from moekit.ops.ablation.run import check_engine

        check_engine(loaded)
    if progress:
        progress("mode", 0, mode_line(loaded))
    recorder, input_ids = _record(loaded, layout, domains, batch_size, trace, progress)
    reduce_recorder(recorder)
    meta = _metadata(model, fingerprint, layout, domains, loaded, seq_len=data.seq_len,
                     batch_size=batch_size, max_tokens=max_tokens, fraction=data.fraction,
                     text_field=data.text_field, trace=trace, ranks=dist_context().world_size)
    profile = profile_from_raw(raw := recorder.finish(), [d.name for d in domains], meta)
    if trace and dist_context().is_writer:
        profile.trace = _trace_arrays(raw, domains, input_ids)
    if previous is not None:
        merged = merge_profiles([profile, previous])
        merged.trace, merged.metadata["trace"] = profile.trace, trace
        profile = merged
    if ablation_tokens is not None:
        profile = _with_ablation(profile, loaded, layout, domains, ablation_tokens, batch_size,
                                 ablation_method, progress)
    return profile


def _with_ablation(profile: Profile, engine: Engine, layout: ModelLayout, domains: list[Domain],
                   tokens: int, batch_size: int, method: str,
                   progress: Progress | None) -> Profile:
    """`profile` with the ablation columns of this run's first `tokens` tokens."""
    from moekit.ops.ablation.run import profile_ablation  # imports torch (runtime.layers)

    def step(what: str, done: int, steps: int) -> None:
        if progress:
            progress("ablation", done, f"{what} {steps}")

    frame, info = profile_ablation(engine, layout, domains, tokens=tokens,
                                   batch_size=batch_size, method=method, progress=step)
    return attach(profile, frame, info)


def _previous(folder: Path, fingerprint: str) -> Profile:
    previous = load_profile(folder)
    if previous.fingerprint != fingerprint:
        raise StatsError(
            f"--merge-with {folder} profiles another model (fingerprint {previous.fingerprint}, "
            f"model {previous.metadata.get('model')}; this model is {fingerprint})",
            "merge only profiles of the same checkpoint")
    return previous


def work_list(domains: list[Domain], batch_size: int) -> list[tuple[int, Any]]:
    """(domain index, input ids [B, S]) of every batch, in run order (a data-parallel caller
    shards this list)."""
    return [(index, batch) for index, domain in enumerate(domains)
            for batch in batches(domain, batch_size)]


def _record(engine: Engine, layout: ModelLayout, domains: list[Domain], batch_size: int,
            trace: bool, progress: Progress | None) -> tuple[Recorder, list[list[Any]]]:
    """Run every window once through the engine with the hooks attached; returns the recorder
    and, with `trace`, the input ids of each domain in the order they ran."""
    import torch

    recorder = Recorder(len(domains), trace=trace)
    work = work_list(domains, batch_size)
    mine = shard_for_rank(work)  # this rank's share (all of it outside torchrun)
    input_ids: list[list[Any]] = [[] for _ in domains]
    for index, batch in work if trace else ():
        input_ids[index].append(batch.reshape(-1).to(torch.int32))
    if progress:
        progress("start", sum(int(batch.numel()) for _, batch in mine), "")

    def before(i: int) -> None:
        recorder.set_batch(mine[i][0], tuple(mine[i][1].shape))

    def advance(i: int, fraction: float) -> None:
        if progress:
            progress("batch", mine[i][1].numel() * fraction, domains[mine[i][0]].name)

    with RoutingHooks(engine.model, layout.family, recorder, device=engine.device):
        for _ in engine.run([batch for _, batch in mine], before=before, progress=advance):
            pass
    return recorder, input_ids


def _trace_arrays(raw: list[Any], domains: list[Domain],
                  input_ids: list[list[Any]]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for index, domain in enumerate(domains):
        out[f"{domain.name}/input_ids"] = torch.cat(input_ids[index]).numpy()
        for layer in raw:
            ids, weights = layer.trace[index]
            out[f"{domain.name}/layer_{layer.layer}/ids"] = ids
            out[f"{domain.name}/layer_{layer.layer}/weights"] = weights
    return out


def _metadata(model: str | Path, fingerprint: str, layout: ModelLayout, domains: list[Domain],
              loaded: Engine, **settings: Any) -> dict[str, Any]:
    family = layout.family
    experts = [layer.num_experts for layer in layout.moe_layers]
    top_k = [layout.top_k(i) for i in range(len(layout.moe_layers))]
    dtype = str(loaded.dtype).removeprefix("torch.")
    start, end = settings.pop("fraction")
    return {
        "moekit_version": __version__, "format_version": 1, "model": str(model),
        "model_fingerprint": fingerprint, "family": family.name,
        "model_type": str(layout.config.get("model_type", "")), "num_layers": layout.num_layers,
        "moe_layers": [layer.index for layer in layout.moe_layers],
        "num_experts": experts[0] if len(set(experts)) == 1 else experts,
        "top_k": top_k[0] if len(set(top_k)) == 1 else top_k,
        "routing": family.router.describe(), "reap_semantics": _reap_semantics(family),
        "device": str(loaded.device), "dtype": dtype, "runtime": loaded.describe(),
        "data_range": f"{start:g}:{end:g}", **settings,
        "domains": {d.name: {"tokens": d.num_tokens, "sha256": d.sha256, "files": d.files,
                             "windows": len(d.windows)} for d in domains},
        "command": shlex.join(["moekit", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _reap_semantics(family: Any) -> str:
    if family.router.input_scaled:
        return ("the router score s scales the expert input: weight = s, ean = ||f_e(x)||, "
                "reap = ||f_e(s*x)|| (norm of the contribution actually added)")
    return "weight = applied top-k weight g, ean = ||f_e(x)||, reap = g * ||f_e(x)||"


def write_output(profile: Profile, out: Path, *, overwrite: bool = False,
                 inputs: tuple[Path, ...] = (), plots: bool = True,
                 plot_layer: int | None = None) -> list[str]:
    """Write the profile folder (staged: it appears whole or not at all): statistics, metadata,
    optional trace, and with `plots` the PNGs and report.md. Returns the file names."""
    if plot_layer is not None and plot_layer not in profile.moe_layers:
        raise InvalidArgumentError(f"--plot-layer {plot_layer} is not a MoE layer",
                                   f"choose one of {profile.moe_layers}")
    with staged_output(out, overwrite, inputs) as folder:
        names = save_profile(profile, folder)
        if plots:
            files = write_plots(profile, folder, plot_layer)
            if has_ablation(profile):
                scatter_plot(profile, Path(folder) / PLOT_FILE)
                files["ablation"] = PLOT_FILE
            write_report(profile, folder, files)
            names += [*files.values(), "report.md", "report.html"]
    return names
