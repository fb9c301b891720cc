"""Preemption rehearsal: kill the local workload N times at seeded random points, as a
spot reclaim would (SIGKILL), and let the controller relaunch it exactly as the cloud path does.

A kill point is "after the k-th progress event of the attempt" with k drawn from a seeded
RNG, so a rehearsal is reproducible. Each kill records the work it lost: the optimizer steps
done since the last checkpoint of the step that was running.

A rehearsal's kills are its own, not a provider's failures: the controller neither counts them
against its recovery limit (``MAX_RECOVERIES``) nor backs off before relaunching after one, so
``--simulate-preemption N`` means N kills, whatever N. A pipeline that ends before the next kill
point gets fewer; ``shortfall`` says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Kill:
    attempt: int
    step_index: int | None
    step_kind: str | None
    at_step: int
    last_checkpoint: int
    checkpoint_every: int | None

    @property
    def lost_steps(self) -> int:
        return max(0, self.at_step - self.last_checkpoint)

    def describe(self) -> str:
        where = f"{self.step_index}:{self.step_kind}" if self.step_kind else "startup"
        return (f"rehearsal kill at step {self.at_step} of {where}; last checkpoint {self.last_checkpoint}; "
                f"lost {self.lost_steps} steps")


@dataclass
class Rehearsal:
    kills: int
    seed: int = 0
    max_events: int = 6
    done: list[Kill] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._target: int | None = None
        self._seen = 0
        self._last: dict[str, Any] = {}
        self._checkpoints: dict[int, int] = {}

    def on_launch(self) -> None:
        self._seen = 0
        self._target = self.rng.randint(1, self.max_events) if len(self.done) < self.kills else None

    def observe(self, events: list[dict[str, Any]]) -> bool:
        """Feed the attempt's new events; True when it is time to kill."""
        for e in events:
            if e.get("event") == "checkpoint":
                self._checkpoints[int(e.get("index", -1))] = int(e.get("step", 0))
            elif e.get("event") == "progress":
                self._seen += 1
                self._last = e
        return self._target is not None and self._seen >= self._target

    def killed(self, attempt: int) -> bool:
        """Whether attempt ``attempt`` ended by one of this rehearsal's kills."""
        return any(k.attempt == attempt for k in self.done)

    def shortfall(self) -> str | None:
        """A sentence when fewer kills happened than were asked for, else None."""
        if len(self.done) >= self.kills:
            return None
        return (f"only {len(self.done)} of the {self.kills} kills asked for happened: the pipeline ended before "
                f"the next kill point (a kill comes after 1 to {self.max_events} progress events of an attempt); "
                "rehearse a longer pipeline, or ask for fewer kills")

    def record(self, attempt: int, checkpoint_every: dict[int, int]) -> Kill:
        index = self._last.get("index")
        kill = Kill(attempt=attempt, step_index=index, step_kind=self._last.get("kind"),
                    at_step=int(self._last.get("step", 0)),
                    last_checkpoint=self._checkpoints.get(int(index), 0) if index is not None else 0,
                    checkpoint_every=checkpoint_every.get(int(index)) if index is not None else None)
        self.done.append(kill)
        self._target = None
        return kill
