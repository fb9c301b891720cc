"""The manager's one clock, injected wherever time is read or waited for.

Two readings, never mixed: ``time()`` is wall time, for records (when an attempt started, a ledger
row's timestamp) and for the deadline handed to the workload (another process compares it with its
own wall clock); ``monotonic()`` is for durations and deadlines inside the manager, which a clock
step (NTP, a laptop waking up) must not stretch or shrink. ``sleep`` waits.

Tests pass a ``ManualClock`` and move time themselves: no test sleeps to make time pass, and no
assertion depends on how fast this machine is.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall time, seconds since the epoch: for records."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going back: for durations and deadlines."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told (``advance``) or slept on (``sleep`` advances it at once)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 0.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


SYSTEM: Clock = SystemClock()
