"""Data-parallel runs under torchrun: every rank runs a disjoint share of the batches, the sums
are combined with torch.distributed collectives, and rank 0 alone writes and prints.

    torchrun --nproc-per-node N [--nnodes M --node-rank I --rdzv-endpoint HOST:PORT ...] \\
        -m moekit profile|eval ...

Every rank tokenises the same data into the same batches, then keeps its contiguous share
(`shard_for_rank`); a rank with no batch still joins every collective with zeros. Combining
(R ranks, exact for int64, float64 sums equal up to summation order):

    tokens, weight_sum, ean_sum, reap_sum, coact, entropy_sum,
    top1_repeats, positions, top1_pairs           all_reduce SUM
    max_norm                                      all_reduce MAX
    trace parts, per-window parts                 gathered to rank 0, concatenated in rank order
    eval loss, kl, agree, tokens (per dataset)    all_reduce SUM

Shares are contiguous, so concatenating per-rank traces in rank order gives the single-process
order. Backend: gloo on CPU-only hosts; `cpu:gloo,cuda:nccl` where CUDA exists (each collective
goes by its tensor's device; Python objects and CPU sums go through gloo), one GPU per local rank.

Integration points (what a command or the layer-streaming engine calls):

    distributed_command(func)  CLI decorator: init from the torchrun environment, the failure
                               protocol below, destroy_process_group on every rank
                               (library code under torchrun: init_from_env() ... shutdown())
    dist_context()             DistContext of this process (rank 0 of 1 outside torchrun)
    rank_device(device)        --device as this rank uses it (auto/cuda -> cuda:LOCAL_RANK)
    shard_for_rank(items)      this rank's contiguous share of a list of batches
    reduce_layer(acc)          combine one LayerAccumulator, once (at its layer boundary when
                               streaming: ranks stay in step, a failure stops all within a layer)
    reduce_recorder(recorder)  combine every layer of a Recorder not combined yet
    reduce_eval_sums(sums)     combine eval's per-dataset loss/kl/agree/tokens sums
    ready_to_write()           collective commit point: raises if any rank failed, then True on
                               rank 0 only (write the staged output, print results)
    is_writer()                True on rank 0, no communication (draw the progress bar)

With layer streaming, the caller hands `shard_for_rank(batches)` to the engine, which calls
`reduce_layer` after the last batch of each layer; `reduce_recorder` then finds nothing left.

Failure protocol: each collective step starts with `agree()`, an all_gather of every rank's
status (None, or "ErrorType: message"). A rank that raises outside a collective step joins the
next agreement with its error (in `distributed_command`); every rank then raises
DistributedError naming the first failing rank and its error. Rank 0 prints it (exit 2), the
others exit 1 silently, and since agreement precedes the write, nothing is written. A rank that
dies without reporting (killed, or an error between two collectives) is seen by torchrun, which
stops the others (SIGTERM); a peer already inside a collective may first report the lost rank.
A rank that hangs blocks the others for MOEKIT_DIST_TIMEOUT seconds (default 3600). No barrier
runs in a `finally:`.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from moekit.errors import DistributedError, InvalidArgumentError, MoekitError

if TYPE_CHECKING:
    import torch

    from moekit.calib.recorder import LayerAccumulator, Recorder

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
TIMEOUT_ENV = "MOEKIT_DIST_TIMEOUT"
INT_SUMS = ("coact", "top1_repeats")
FLOAT_SUMS = ("sums", "entropy_sum")  # sums: tokens (exact in float64), weight, EAN, REAP


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a torchrun job (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


_STATE: dict[str, Any] = {"context": DistContext(), "broken": False}


def dist_context() -> DistContext:
    """The context set by `init_from_env` (single process until then)."""
    return _STATE["context"]


def is_writer() -> bool:
    """True on the rank that writes outputs, prints and draws progress (rank 0)."""
    return dist_context().is_writer


def launched_by_torchrun() -> bool:
    """torchrun (or any env:// launcher) exported RANK and a WORLD_SIZE above 1."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> DistContext:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / MASTER_ADDR / ...
    (gloo, plus nccl for CUDA tensors when CUDA is available) and bind LOCAL_RANK's GPU."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    seconds = float(os.environ.get(TIMEOUT_ENV, "3600"))
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} could not join the process group: "
                               f"{_first_line(err)}", "check MASTER_ADDR/--rdzv-endpoint and "
                               "that every node runs the same torchrun command") from err
    _STATE["context"], _STATE["broken"] = DistContext(rank, world, local), False
    return _STATE["context"]


def _settle() -> None:
    """After the last successful collective, wait until every rank is done with it before any
    rank tears its group down: a rank that destroys its gloo pairs while a peer is still
    finishing the last all-gather can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    with _collective():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (every rank, no barrier) and return to single-process mode.
    After a broken collective the group is left to process exit: destroying it then can block
    (NCCL) while a peer is gone or still inside a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and not _STATE["broken"]:
        dist.destroy_process_group()
    _STATE["context"] = DistContext()


def rank_device(device: str) -> str:
    """The device a rank runs on: `auto`/`cuda` -> `cuda:LOCAL_RANK` (one GPU per local rank),
    `cpu` stays; unchanged outside torchrun."""
    ctx = dist_context()
    if not ctx.enabled or device == "cpu":
        return device
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device not in ("auto", "cuda"):
        raise InvalidArgumentError(f"--device {device} under torchrun: each rank uses the GPU "
                                   "of its LOCAL_RANK", "pass --device cuda, auto or cpu")
    if ctx.local_rank >= torch.cuda.device_count():
        raise InvalidArgumentError(
            f"local rank {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
            "run at most one process per GPU: --nproc-per-node <= the GPU count")
    return f"cuda:{ctx.local_rank}"


def shard_for_rank(items: Sequence[T], rank: int | None = None,
                   world_size: int | None = None) -> list[T]:
    """Contiguous share of `items` for `rank`: n // R items each, the first n % R ranks one
    more, so shares are disjoint, cover `items` in order, and differ in length by at most 1."""
    ctx = dist_context()
    rank = ctx.rank if rank is None else rank
    world = ctx.world_size if world_size is None else world_size
    if not 0 <= rank < world:
        raise InvalidArgumentError(f"rank {rank} is outside 0..{world - 1}")
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


@contextmanager
def _collective() -> Iterator[None]:
    """Mark a run of collectives: an error escaping it leaves the ranks out of step, so the
    failing rank must not join another agreement (it exits; its peers' collectives fail)."""
    try:
        yield
    except BaseException:
        _STATE["broken"] = True
        raise


def agree(error: BaseException | None = None) -> None:
    """Collective: share each rank's status; raise DistributedError on every rank when any
    rank reports an error (named: rank, error type and message)."""
    ctx = dist_context()
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    status = None if error is None else f"{type(error).__name__}: {_first_line(error)}"
    statuses: list[Any] = [None] * ctx.world_size
    try:
        with _collective():
            dist.all_gather_object(statuses, status)
    except RuntimeError as err:
        raise DistributedError(f"rank {ctx.rank} lost the other ranks: {_first_line(err)}",
                               "another rank died; see its output above") from err
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        rank, message = failed[0]
        more = f"; {len(failed) - 1} more rank(s) failed" if len(failed) > 1 else ""
        raise DistributedError(f"rank {rank} of {ctx.world_size} failed: {message}{more}",
                               "every rank stopped; nothing was written")


def ready_to_write() -> bool:
    """Every rank calls this before the output is written: raises if any rank failed so far,
    then True on rank 0 only."""
    agree()
    return is_writer()


def _all_reduce_flat(tensors: list[torch.Tensor], op: Any) -> None:
    """all_reduce several same-dtype tensors as one flat buffer, results copied back."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op)
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))


def reduce_layer(acc: LayerAccumulator) -> None:
    """Combine one layer's accumulator across ranks, in place (see the module docstring).
    Once only: a later call on the same accumulator (e.g. reduce_recorder after per-layer
    reductions by the streaming engine) does nothing, on every rank alike."""
    if not dist_context().enabled or getattr(acc, "reduced_across_ranks", False):
        return
    import torch
    import torch.distributed as dist

    agree()
    acc.flush()
    with _collective():
        counts = torch.tensor([acc.positions, acc.top1_pairs], dtype=torch.int64,
                              device=acc.sums.device)
        _all_reduce_flat([*(getattr(acc, n) for n in INT_SUMS), counts], dist.ReduceOp.SUM)
        _all_reduce_flat([getattr(acc, n) for n in FLOAT_SUMS], dist.ReduceOp.SUM)
        dist.all_reduce(acc.max_norm, op=dist.ReduceOp.MAX)
        acc.positions, acc.top1_pairs = (row.tolist() for row in counts.cpu())
        if acc.trace:
            acc.trace_parts = _gather_parts(acc.trace_parts)
        acc.window_parts = _gather_parts(acc.window_parts)
    acc.reduced_across_ranks = True


def _gather_parts(parts: list[list[tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
    """Per-domain lists of tensor tuples (trace parts, per-window sums): rank 0 receives every
    rank's, in rank order (= the single-process order, shares being contiguous); the other
    ranks drop theirs (they write nothing)."""
    import torch.distributed as dist

    ctx = dist_context()
    local = [[tuple(t.cpu() for t in part) for part in domain] for domain in parts]
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_writer else None
    dist.gather_object(local, gathered, dst=0)
    if gathered is None:
        return [[] for _ in parts]
    return [[part for rank_parts in gathered for part in rank_parts[d]]
            for d in range(len(parts))]


def reduce_recorder(recorder: Recorder) -> None:
    """Combine every layer of `recorder` across ranks (layers in index order on every rank)."""
    for layer in sorted(recorder.layers):
        reduce_layer(recorder.layers[layer])


def reduce_eval_sums(sums: Mapping[str, Any]) -> None:
    """Sum eval's per-dataset accumulators (objects with float `loss`, `kl`, `agree`, `ref_loss`
    and int `tokens`) across ranks, in place; every rank holds the same dataset names in order."""
    if not dist_context().enabled:
        return
    import torch
    import torch.distributed as dist

    agree()
    rows = list(sums.values())
    with _collective():
        floats = torch.tensor([[s.loss, s.kl, s.agree, s.ref_loss] for s in rows],
                              dtype=torch.float64)
        tokens = torch.tensor([s.tokens for s in rows], dtype=torch.int64)
        dist.all_reduce(floats, op=dist.ReduceOp.SUM)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    for row, (loss, kl, agreed, ref_loss), count in zip(rows, floats.tolist(), tokens.tolist(),
                                                        strict=True):
        row.loss, row.kl, row.agree, row.ref_loss, row.tokens = loss, kl, agreed, ref_loss, count


def distributed_command(func: F) -> F:
    """Run a CLI command as one rank of a torchrun job when launched by torchrun (else as is):
    join the group, run, agree that every rank succeeded, leave the group. Place it under
    `@handle_errors`: rank 0 raises the one DistributedError message, other ranks exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not launched_by_torchrun():
            return func(*args, **kwargs)
        ctx = init_from_env()
        try:
            result = func(*args, **kwargs)
            agree()
            _settle()
            return result
        except Exception as err:
            _fail(ctx, err)
        except BaseException:  # Ctrl-C, SIGTERM from torchrun: leave without a collective
            _STATE["broken"] = True
            raise
        finally:
            shutdown()

    wrapper.data_parallel = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _fail(ctx: DistContext, err: Exception) -> None:
    """Bring `err` to the agreement unless it already came from one (or the ranks are out of
    step); rank 0 re-raises the joint error, the other ranks leave quietly with exit 1."""
    joint = err
    if not isinstance(err, DistributedError) and not _STATE["broken"]:
        _record_error_file(err)
        try:
            agree(err)
        except DistributedError as agreed:
            joint = agreed
    if ctx.is_writer or _STATE["broken"]:
        raise joint
    sys.exit(1)


def _record_error_file(err: Exception) -> None:
    """Write an unexpected error (not a MoekitError, whose one line says it all) with its
    traceback where torchrun's failure summary looks for it."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and not isinstance(err, MoekitError):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)


def _first_line(err: BaseException) -> str:
    """The first line of `err`, without gloo's `[/path/pair.cc:553] ` source-location prefix
    (noise for users, and rich would read `[/...]` as a closing markup tag)."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    return text.splitlines()[0] if text else type(err).__name__
