"""A stand-in workload for provider and controller tests that need no torch.

It is a real process speaking the real event protocol (the same bytes the
workload prints), so the local provider and the controller are exercised for
real; only the training is left out. Behaviour comes from environment vars:
STANDIN_STEPS (progress events, one per STANDIN_SLEEP seconds), STANDIN_RC
(exit code), STANDIN_ECHO_ENV (names whose values it writes to
``standin-env.json`` in its working folder). SIGTERM ends it like the workload: a ``stopped`` event, exit 143.
It honours OPTJOB_DEADLINE like the workload: ``stopped`` reason deadline, exit 4.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path[:0] = os.environ.get("STANDIN_ROOT", "").split(os.pathsep)

from optjob.steps.events import Emitter  # noqa: E402


def main() -> int:
    emitter = Emitter()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
    steps = int(os.environ.get("STANDIN_STEPS", "3"))
    pause = float(os.environ.get("STANDIN_SLEEP", "0.05"))
    deadline = float(os.environ.get("OPTJOB_DEADLINE", "inf"))
    attempt = int(os.environ.get("OPTJOB_ATTEMPT", "1"))
    emitter.emit("step_started", index=0, kind="train", total=1)
    if names := os.environ.get("STANDIN_ECHO_ENV"):  # what the workload's environment holds
        with open("standin-env.json", "w") as out:  # the cwd is the job's folder
            json.dump({n: os.environ.get(n) for n in names.split(",")}, out)
    for step in range(1, steps + 1):
        if stop["now"] or time.time() >= deadline:
            reason = "signal" if stop["now"] else "deadline"
            emitter.emit("stopped", index=0, reason=reason, step=step)
            return 143 if reason == "signal" else 4
        emitter.emit("progress", index=0, kind="train", step=step, max_steps=steps, loss=1.0 / step,
                     tokens_per_s=1000.0, attempt=attempt)
        time.sleep(pause)
    emitter.emit("step_done", index=0, kind="train", wall_s=steps * pause, metrics={})
    emitter.emit("job_done", results="results.json", wall_s=steps * pause)
    return int(os.environ.get("STANDIN_RC", "0"))


if __name__ == "__main__":
    raise SystemExit(main())
