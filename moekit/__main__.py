"""`python -m moekit ...` and `torchrun --nproc-per-node N -m moekit profile|eval ...`."""

from __future__ import annotations

import os


def run() -> None:
    """Start the CLI; under torchrun, wrapped in torch's `@record` so that an error escaping
    the commands' own handling lands in TORCHELASTIC_ERROR_FILE for the launcher's summary."""
    from moekit.cli.app import main

    if "TORCHELASTIC_RUN_ID" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()


if __name__ == "__main__":
    run()
