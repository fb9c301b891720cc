"""``python -m optjob.steps run JOB_DIR`` (see ``optjob.steps.runner``)."""

from __future__ import annotations

import traceback


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
    return main(hard_deadline=True)  # this process is the workload: its deadline is a hard one


if __name__ == "__main__":
    from optjob.steps.shutdown import exit_now, record_exit

    exit_now(record_exit(_main()))
