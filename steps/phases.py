"""Phase events: what the workload is doing now, so the console never goes silent.

A ``phase`` event (``steps.events``) has ``phase`` (an id below), ``state`` (``start``, ``update``,
``end``) and, where known, ``index``/``kind`` (the step), ``done``/``total``/``unit`` (progress within
the phase: evaluation batches) and, at ``end``, ``wall_s``. Top-level phases follow one another
(``enter`` ends the one before); ``checkpoint``, ``upload``, ``pull`` and ``reload`` nest inside one
(``span``). A phase cut short (a stop, an error) gets no ``end``: the ``stopped``/``error`` event says
why.

======== ====================================================
starting the process is up: device, threads, step modules
pull     artifacts of earlier attempts pulled from storage
data     corpus and tokenizer (cached after the first attempt)
baseline the automatic evaluation of the starting model
step     step ``index`` (``kind``) doing its own work
step_eval the automatic evaluation of step ``index``'s output
final    the automatic evaluation of the last model
checkpoint a training checkpoint being written (and pushed)
upload   finished steps pushed to storage
reload   (dry run) a step's output loaded back as a user would
======== ====================================================

Steps report progress inside a phase with :func:`update` (a no-op outside a runner's phase, so a step
run alone emits nothing extra). Updates are thinned so a long loop does not flood the log, and by
count, not time, so two runs of one job write the same stream: the first, the last and every
``total // UPDATES`` th where the total is known; else one per ``UPDATE_EVERY_S``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .events import Emitter

PHASES = frozenset({"starting", "pull", "data", "baseline", "step", "step_eval", "final", "checkpoint",
                    "upload", "reload"})
#: About how many ``update`` events a loop of known length emits (the first and the last always go).
UPDATES = 20
#: Where the length is unknown: the least time between two ``update`` events of one phase.
UPDATE_EVERY_S = 2.0


class PhaseLog:
    """The phases of one workload process, written as ``phase`` events on ``emitter``."""

    def __init__(self, emitter: Emitter, clock: Any = time.monotonic) -> None:
        self.emitter, self.clock = emitter, clock
        self._open: list[tuple[str, dict[str, Any], float]] = []  # (phase, fields, started)
        self._last_update = float("-inf")

    @property
    def current(self) -> str | None:
        """The innermost open phase."""
        return self._open[-1][0] if self._open else None

    def start(self, phase: str, **fields: Any) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        fields = {k: v for k, v in fields.items() if v is not None}
        self._open.append((phase, fields, self.clock()))
        self._last_update = float("-inf")
        self.emitter.emit("phase", phase=phase, state="start", **fields)

    def end(self, phase: str | None = None) -> None:
        """End the innermost open phase (``phase``: only if it is that one)."""
        if not self._open or (phase is not None and self._open[-1][0] != phase):
            return
        name, fields, started = self._open.pop()
        self.emitter.emit("phase", phase=name, state="end", wall_s=round(self.clock() - started, 3), **fields)

    def enter(self, phase: str, **fields: Any) -> None:
        """End every open phase and start ``phase``: the next top-level phase."""
        while self._open:
            self.end()
        self.start(phase, **fields)

    def leave(self) -> None:
        """End every open phase."""
        while self._open:
            self.end()

    @contextmanager
    def span(self, phase: str, **fields: Any) -> Iterator[None]:
        """A nested phase around a block; it ends when the block does (not when it raises)."""
        self.start(phase, **fields)
        yield
        self.end(phase)

    def update(self, done: int, total: int | None = None, unit: str | None = None, **fields: Any) -> None:
        if not self._open:
            return
        now = self.clock()
        if total:
            if 1 < done < total and done % max(1, total // UPDATES):
                return
        elif done > 1 and now - self._last_update < UPDATE_EVERY_S:
            return
        self._last_update = now
        name, opened, _ = self._open[-1]
        extra = {k: v for k, v in {"total": total, "unit": unit, **fields}.items() if v is not None}
        self.emitter.emit("phase", phase=name, state="update", **opened, done=done, **extra)


#: The phase log of the runner in this process (None: a step run alone, as tests do).
_active: PhaseLog | None = None


def install(log: PhaseLog | None) -> None:
    global _active
    _active = log


def active() -> PhaseLog | None:
    return _active


def update(done: int, total: int | None = None, unit: str | None = None, **fields: Any) -> None:
    """Progress inside the current phase (evaluation batches...); nothing outside a runner."""
    if _active is not None:
        _active.update(done, total, unit, **fields)


def start(phase: str, **fields: Any) -> None:
    """A nested phase begins (a checkpoint write); nothing outside a runner."""
    if _active is not None:
        _active.start(phase, **fields)


def end(phase: str) -> None:
    """The nested phase ``phase`` ends; nothing outside a runner."""
    if _active is not None:
        _active.end(phase)
