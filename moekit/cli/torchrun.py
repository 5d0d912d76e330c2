"""`python -m moekit.cli.torchrun ARGS`: torchrun with ARGS as given, without the launcher's
noise. torchrun answers any rank's non-zero exit with a 30-line traceback of its own
(`ChildFailedError`) and a failure summary, and its own SIGTERM/Ctrl-C with another traceback,
although moekit's ranks already said what went wrong in one line on rank 0. Here a failed run
ends with that line alone, and the exit code is the run's: rank 0's (2 for an error moekit
names, 128 + N for a signal N), else the first failing rank's; the launcher's own SIGTERM or
Ctrl-C gives 128 + N after the ranks were stopped.

    python -m moekit.cli.torchrun --standalone --nproc-per-node 8 -m moekit profile ...

A rank that died without a word (killed, a segfault) is named in one line; plain `torchrun`
shows the launcher's own detail."""

from __future__ import annotations

import logging
import sys
from typing import Any

MOEKIT_EXITS = (1, 2)  # a failure moekit handled: rank 0 printed its line (ranks > 0 exit 1)


def outcome(failures: dict[int, Any]) -> tuple[int, str | None]:
    """(exit code, line to print or None) from torchrun's {global rank: ProcessFailure} (only
    the ranks that had failed when torchrun looked). Ranks that exited with a code come first
    (a rank killed by a signal is most often one torchrun stopped after another failed): rank
    0's code, else a code moekit gives (1, 2: rank 0 printed the run's error; 128 + N: a
    signal, said on rank 0), else the first such rank is named here; with only signals, the
    first rank killed is named (torchrun's exitcode -N: 128 + N)."""
    exited = {rank: int(f.exitcode) for rank, f in failures.items() if f.exitcode > 0}
    if 0 in exited:
        return exited[0], None
    first = min(exited or failures, key=lambda r: failures[r].timestamp)
    code = int(failures[first].exitcode)
    if code in MOEKIT_EXITS:
        return 2, None
    if code >= 128:
        return code, None
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code} unannounced"
    return (128 - code if code < 0 else code), (
        f"error: rank {first} {how} (every rank stopped; nothing was written)")


def main(argv: list[str] | None = None) -> None:
    """Run torchrun's `run(parse_args(argv))`; map its failures to one line and an exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # each sets its own level on import
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        code, line = outcome(err.failures)
        if line:
            print(line, file=sys.stderr)
        sys.exit(code)
    except SignalException as err:
        sys.exit(128 + int(err.sigval))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
