"""``python -m optjob.steps run JOB_DIR`` (see ``optjob.steps.runner``)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path


def _main() -> int:
    try:
        from optjob.steps.runner import main
    except BaseException as exc:  # torch or transformers missing or broken: still report it
        from optjob.steps.events import Emitter

        traceback.print_exc()
        Emitter().emit(
            "error", message=f"the workload cannot start: {exc}", error_type=type(exc).__name__
        )
        return 1
    return main()


def _record(code: int) -> int:
    """Each node's local rank 0 leaves its exit status in ``JOB_DIR/exit-code``: torchrun
    reports 1 for any failing worker, which would hide a graceful stop (4 or 143) from the
    cloud run script (providers/sky_task.py)."""
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "run" and os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
        with contextlib.suppress(OSError):
            path = Path(args[1]) / "exit-code"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{code}\n")
            os.replace(tmp, path)
    return code


if __name__ == "__main__":
    from optjob.steps.shutdown import exit_now

    exit_now(_record(_main()))
