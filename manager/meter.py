"""The cost meter and the budget arithmetic.

Spend is node-hours x the hourly price of what actually ran, summed over every
attempt, from launch until teardown is confirmed; it is written to the ledger
as it accrues, so a killed manager loses at most one tick of metering and the
next reconcile catches up from the attempt's start time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .store import AttemptRow, Store

#: Seconds between "the workload must be gone" and the provider confirming it is (exit, teardown,
#: one manager tick), by provider: the workload's own deadline is this far before the cap, and the
#: manager kills at the latest this far before it. Local: the process group dies and billing ends at
#: the exit file's time. SkyPilot: cancel, termination and its confirmation.
STOP_MARGIN_S = {"local": 1.0, "skypilot": 180.0}
#: A checkpoint's write time before one has been measured (the workload reports each one's).
DEFAULT_CHECKPOINT_S = 2.0
#: Bounds of the grace a workload gets between SIGTERM and SIGKILL.
MIN_GRACE_S, MAX_GRACE_S = 2.0, 600.0


def teardown_margin_s(provider: str) -> float:
    return STOP_MARGIN_S.get(provider, 60.0)


def stop_margin_s(provider: str, checkpoint_s: float | None) -> float:
    """How long before the cap a stop must be asked for: one checkpoint write, then teardown."""
    return teardown_margin_s(provider) + (DEFAULT_CHECKPOINT_S if checkpoint_s is None else checkpoint_s)


def grace_s(checkpoint_s: float | None) -> float:
    """How long a workload asked to stop may take before it is killed: three of its checkpoint
    writes (measured), within [MIN_GRACE_S, MAX_GRACE_S]. The money cap bounds it further: a kill
    comes at the latest ``teardown_margin_s`` before the cap, whatever the grace."""
    measured = DEFAULT_CHECKPOINT_S if checkpoint_s is None else checkpoint_s
    return min(MAX_GRACE_S, max(MIN_GRACE_S, 3.0 * measured))


def slowest_checkpoint_s(events: list[dict[str, object]]) -> float | None:
    """The longest checkpoint write among ``events`` (``checkpoint`` events carry ``seconds``)."""
    times = [float(e["seconds"]) for e in events  # type: ignore[arg-type]
             if e.get("event") == "checkpoint" and isinstance(e.get("seconds"), (int, float))]
    return max(times) if times else None


@dataclass(frozen=True)
class Budget:
    max_usd: float | None
    max_hours: float | None

def rate_usd_per_s(attempt: AttemptRow) -> float:
    return attempt.hourly_usd * attempt.nodes / 3600.0


def meter(store: Store, attempt: AttemptRow, until: float | None = None) -> float:
    """Record spend for ``attempt`` up to ``until`` (now); returns the job's total spend."""
    end = until if until is not None else store.clock.time()
    store.bill_until(attempt.job_name, attempt.number, seconds=end - attempt.started_at,
                     usd_per_s=rate_usd_per_s(attempt), hourly_usd=attempt.hourly_usd, nodes=attempt.nodes,
                     spot=bool(attempt.spot))
    return store.spend(attempt.job_name)


def job_elapsed_s(store: Store, job: str) -> float:
    """Wall time across every attempt (what max_hours caps)."""
    return store.elapsed_seconds(job)


def seconds_left(budget: Budget, *, spent: float, elapsed_s: float, usd_per_s: float, margin_s: float) -> float | None:
    """How long the job may still run before stopping, keeping ``margin_s`` for stop and teardown.
    None means no cap applies."""
    limits = []
    if budget.max_usd is not None and usd_per_s > 0:
        limits.append((budget.max_usd - spent) / usd_per_s - margin_s)
    if budget.max_hours is not None:
        limits.append(budget.max_hours * 3600.0 - elapsed_s - margin_s)
    return min(limits) if limits else None


def over_budget(budget: Budget, *, spent: float, elapsed_s: float, usd_per_s: float, margin_s: float) -> str | None:
    """Why the job must stop now, or None."""
    if budget.max_usd is not None and spent + usd_per_s * margin_s >= budget.max_usd:
        return f"spend ${spent:.4f} is at the ${budget.max_usd:.2f} cap"
    if budget.max_hours is not None and elapsed_s + margin_s >= budget.max_hours * 3600.0:
        return f"wall time {elapsed_s / 3600:.3f} h is at the {budget.max_hours:g} h cap"
    return None


def checkpoint_interval_s(events: list[dict[str, object]]) -> float | None:
    """The median time between two checkpoints of one step (None before two were written)."""
    import itertools
    import statistics

    by_step: dict[object, list[float]] = {}
    for e in events:
        if e.get("event") == "checkpoint" and isinstance(e.get("ts"), (int, float)):
            by_step.setdefault(e.get("index"), []).append(float(e["ts"]))  # type: ignore[arg-type]
    gaps = [b - a for times in by_step.values() for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(gaps) if gaps else None
