"""The budget deadline as a hard stop, whatever the workload is doing.

``StopFlag`` makes the deadline a graceful stop for loops that check it (training checkpoints
first). Some phases never check it: a tokenizer, a long generation, a blocking read, a library call.
The watchdog is a daemon thread that wakes at the deadline itself and ends the process there: it
emits a ``stopped`` event (reason ``deadline-hard``) and exits with the deadline's exit code. The
manager's deadline already leaves the teardown margin before the cap, so the cap holds with no
manager alive. Checkpoints are written atomically (a manifest last), so a process ended in the
middle of one keeps the previous one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from .exit_codes import EXIT_DEADLINE
from .shutdown import exit_at_once


class Watchdog:
    """An armed watchdog; ``disarm`` once the run is over (an in-process run must not end its host)."""

    def __init__(self, thread: threading.Thread, disarmed: threading.Event) -> None:
        self.thread, self._disarmed = thread, disarmed

    def disarm(self) -> None:
        self._disarmed.set()


def arm(deadline: float | None, on_fire: Callable[[], object], *,
        clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
        exit_now: Callable[[int], object] = exit_at_once) -> Watchdog | None:
    """Start the watchdog for ``deadline`` (unix seconds; None: no deadline, no watchdog).

    At the deadline ``on_fire`` runs (it should emit the ``stopped`` event; its errors are
    ignored), then the process exits with ``EXIT_DEADLINE`` without waiting for anything."""
    if deadline is None:
        return None
    disarmed = threading.Event()

    def watch() -> None:
        while (left := deadline - clock()) > 0:
            if disarmed.is_set():
                return
            sleep(min(left, 0.5))
        if disarmed.is_set():
            return
        try:
            on_fire()
            print("deadline reached in a phase that did not stop: exiting now", file=sys.stderr, flush=True)
        except Exception:  # the exit matters more than the message
            pass
        exit_now(EXIT_DEADLINE)

    thread = threading.Thread(target=watch, name="optjob-deadline-watchdog", daemon=True)
    thread.start()
    return Watchdog(thread, disarmed)
