"""A torchrun entry script for tests: the moekit CLI, with one function made to raise on one
rank after some calls. Environment: FAIL_RANK (int, or "all"), FAIL_TARGET
("module:Qualified.name"), FAIL_AFTER (calls that succeed first, default 1), FAIL_MODE ("raise",
default; "exit": the process dies at once, as if killed; "sleep": it creates the file
FAIL_MARK.RANK and sleeps, to be stopped by a signal)."""

from __future__ import annotations

import functools
import importlib
import os
import time
from pathlib import Path


def inject() -> None:
    if os.environ["FAIL_RANK"] not in ("all", os.environ.get("RANK")):
        return
    module_name, _, qualname = os.environ["FAIL_TARGET"].partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = qualname.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original, calls, after = getattr(owner, attr), [0], int(os.environ.get("FAIL_AFTER", "1"))

    @functools.wraps(original)
    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            if os.environ.get("FAIL_MODE") == "exit":
                os._exit(9)
            if os.environ.get("FAIL_MODE") == "sleep":
                Path(f"{os.environ['FAIL_MARK']}.{os.environ['RANK']}").touch()
                time.sleep(600)
            raise RuntimeError(f"injected failure on call {calls[0]}")
        return original(*args, **kwargs)

    setattr(owner, attr, failing)


if __name__ == "__main__":
    inject()
    from moekit.__main__ import run

    run()
