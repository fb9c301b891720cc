"""What a step gets to work with (``StepContext``), what it returns (``StepOutcome``),
and the stop flag that turns a signal or the budget deadline into a graceful stop."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import layout
from .events import Emitter

if TYPE_CHECKING:
    import torch
    from optjob.specs import JobSpec, StepBase
    from torch import nn

    from .data import Corpus

#: Seconds kept in hand before the deadline besides twice the slowest step or checkpoint seen
#: (OPTJOB_DEADLINE_MARGIN overrides): the stopped event and the exit. Small, so a stop spends the
#: budget; the manager's deadline already leaves its teardown margin before the cap.
DEFAULT_MARGIN_S = 0.5
#: Steps whose slowest sizes the room kept for the step under way (the first, warm-up, step counts
#: only until a second is seen).
RECENT_STEPS = 20
#: A second stop signal this soon after the first is a duplicate delivery, not "stop now".
DUPLICATE_SIGNAL_S = 1.0


class StopRequested(BaseException):
    """Raised (by ``StopFlag.check`` or a training loop) to end the run gracefully.

    ``reason`` is "deadline" or "signal"; ``step`` is the optimizer step reached, if any.
    A BaseException, like KeyboardInterrupt, so ``except Exception`` blocks (and optuna's
    trial runner) let it through to the runner."""

    def __init__(self, reason: str, step: int | None = None) -> None:
        super().__init__(
            f"stop requested: {reason}" + (f" at step {step}" if step is not None else "")
        )
        self.reason = reason
        self.step = step


class StopFlag:
    """Set by SIGTERM/SIGINT, or tripped by the budget deadline (unix seconds).

    The deadline trips early enough for what still has to happen before it: the step under way
    and a checkpoint (the slowest of each seen, reported through ``observe``), plus ``margin``."""

    def __init__(self, deadline: float | None = None, margin: float | None = None) -> None:
        self.deadline = deadline
        if margin is None:
            margin = float(os.environ.get("OPTJOB_DEADLINE_MARGIN", DEFAULT_MARGIN_S))
        self.margin = margin
        self.slowest = 0.0  # the slowest recent unit of work (a step)
        self.slowest_checkpoint = 0.0
        self._steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self._first_step: float | None = None
        self.signalled = False

    def request(self) -> None:
        """Ask for a stop as a signal would."""
        self.signalled = True

    def observe(self, seconds: float, *, checkpoint: bool = False) -> None:
        """Report how long one unit of work (an optimizer step) or a checkpoint write took."""
        if checkpoint:
            self.slowest_checkpoint = max(self.slowest_checkpoint, seconds)
        elif self._first_step is None:  # the first step pays for warm-up (allocations, lazy init)
            self._first_step = self.slowest = seconds
        else:
            self._steps.append(seconds)
            self.slowest = max(self._steps)

    def reason(self) -> str | None:
        if self.signalled:
            return "signal"
        if (
            self.deadline is not None
            # before a checkpoint was timed, one is assumed to take as long as a step
            and time.time() + self.margin + self.slowest + (self.slowest_checkpoint or self.slowest) >= self.deadline
        ):
            return "deadline"
        return None

    def check(self, step: int | None = None) -> None:
        reason = self.reason()
        if reason is not None:
            raise StopRequested(reason, step)

    def install(self) -> None:
        """Handle SIGTERM and SIGINT: the first sets the flag, a second exits at once.

        A second signal within ``DUPLICATE_SIGNAL_S`` of the first is the same request delivered
        twice (a process-tree kill reaches the workload and the shell that forwards to it, as
        SkyPilot's cancel does), not a user insisting: it is ignored, so the checkpoint is written."""
        first = [0.0]

        def handler(signum: int, frame: FrameType | None) -> None:
            if self.signalled:
                if time.monotonic() - first[0] < DUPLICATE_SIGNAL_S:
                    return
                print(f"signal {signum} again: stopping now", file=sys.stderr, flush=True)
                raise StopRequested("signal")
            print(f"signal {signum}: stopping after the current step", file=sys.stderr, flush=True)
            first[0] = time.monotonic()
            self.signalled = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


@dataclass
class StepOutcome:
    """What a step's ``run`` returns: the model for the next step and what to record."""

    model: nn.Module
    metrics: dict[str, Any]
    #: Larger records (loss curve, hpo trials); stored in done.json and results.json.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    spec: JobSpec
    job_dir: Path
    index: int
    emitter: Emitter
    device: torch.device
    dry_run: bool
    corpus: Corpus
    tokenizer: Any
    stop: StopFlag
    cache_dir: Path | None = None
    #: Folder of the model this step starts from (previous step's output), if on disk.
    model_dir: Path | None = None
    attempt: int = 1

    @property
    def step(self) -> StepBase:
        return self.spec.pipeline[self.index]

    @property
    def kind(self) -> str:
        return self.step.kind

    def step_dir(self) -> Path:
        return layout.step_dir(self.job_dir, self.index, self.kind)

    def emit(self, event: str, /, **fields: Any) -> dict[str, Any]:
        """Emit ``event`` with ``index`` and ``kind`` (the step kind) filled in."""
        body = {"index": self.index, "kind": self.kind, **fields}
        return self.emitter.emit(event, **finite(body))


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (events are strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
