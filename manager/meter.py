"""The cost meter and the budget arithmetic.

Spend is node-hours x the hourly price of what actually ran, summed over every
attempt, from launch until teardown is confirmed; it is written to the ledger
as it accrues, so a killed manager loses at most one tick of metering and the
next reconcile catches up from the attempt's start time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .store import AttemptRow, Store

#: Seconds a graceful stop plus teardown is expected to take, by provider.
STOP_MARGIN_S = {"local": 3.0, "skypilot": 180.0}


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
