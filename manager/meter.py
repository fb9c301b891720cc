"""The cost meter and the budget arithmetic.

Spend is node-hours x the hourly price of what actually ran, summed over every
attempt, from the moment its node exists (at launch where the provider starts at
once, as locally; when the provider first reports a node, on SkyPilot) until
teardown is confirmed or the provider's own record says the resources were gone
(``AttemptRow.gone_at``); it is written to the ledger as it accrues, so a killed
manager loses at most one tick of metering and the next reconcile catches up.

What ran is priced when the provider says what it launched (``reprice``: the catalog, or
a live spot price, ``pricing/launched.py``), and every ledger line records its price's
source; until then the plan's price stands (source ``plan``). A recovery onto a pricier
instance is a new price from then on.

SkyPilot's jobs controller has ledger lines of its own (kind ``controller``), from the
attempt's submission to its end, at its instance's price (or SkyPilot's default
controller resources, estimated). Each job is charged the controller in full for the
time its managed job is live, even when another job shares it: a job's cap never counts
on another job's share (``optjob cost`` then counts shared controller time once per job),
and the controller's idle minutes after the last job (10, then it stops) are not billed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .store import AttemptRow, Store

if TYPE_CHECKING:
    from optjob.providers.base import Placement
    from optjob.specs import JobSpec

    from .pricing.launched import Pricer

#: Seconds between "the workload must be gone" and the provider confirming it is (exit, teardown,
#: one manager tick), by provider: the workload's own deadline is this far before the cap, and the
#: manager kills at the latest this far before it. Local: the process group dies and billing ends at
#: the exit file's time. SkyPilot: cancel, termination and its confirmation.
STOP_MARGIN_S = {"local": 1.0, "skypilot": 180.0}
#: A checkpoint's write time before one has been measured (the workload reports each one's).
DEFAULT_CHECKPOINT_S = 2.0
#: Bounds of the grace a workload gets between SIGTERM and SIGKILL.
MIN_GRACE_S, MAX_GRACE_S = 2.0, 600.0


def teardown_margin_s(provider: str, spec: JobSpec | None = None) -> float:
    """Seconds between the workload's exit and its resources being gone. On SkyPilot, given the spec,
    what it takes with no manager alive (``sky_task.unattended_end_s``: the cluster's autostop idle
    minutes, the skylet's check and termination; or the jobs controller's check and termination)."""
    margin = STOP_MARGIN_S.get(provider, 60.0)
    if provider == "skypilot" and spec is not None and spec.resources.cloud != "local":
        from optjob.providers.sky_task import unattended_end_s

        margin = max(margin, unattended_end_s(spec))
    return margin


def stop_margin_s(provider: str, checkpoint_s: float | None, spec: JobSpec | None = None) -> float:
    """How long before the cap a stop must be asked for: one checkpoint write, then teardown."""
    return teardown_margin_s(provider, spec) + (DEFAULT_CHECKPOINT_S if checkpoint_s is None else checkpoint_s)


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
    """What the attempt costs per second: its nodes, and the controller kept up for it."""
    return (attempt.hourly_usd * attempt.nodes + attempt.overhead_usd) / 3600.0


def meter(store: Store, attempt: AttemptRow, until: float | None = None, *, from_launch: bool = True) -> float:
    """Record spend for ``attempt`` up to ``until`` (now), never past ``gone_at``; returns the job's total.

    The nodes bill from ``billed_from`` (or, ``from_launch``, the attempt's start while that is unset;
    otherwise nothing until the provider reports a node); the controller line from the start."""
    end = until if until is not None else store.clock.time()
    if attempt.gone_at is not None:
        end = min(end, attempt.gone_at)
    start = attempt.billed_from if attempt.billed_from is not None else (attempt.started_at if from_launch else None)
    if start is not None:
        store.bill_until(attempt.job_name, attempt.number, seconds=end - start,
                         usd_per_s=attempt.hourly_usd * attempt.nodes / 3600.0, hourly_usd=attempt.hourly_usd,
                         nodes=attempt.nodes, spot=bool(attempt.spot), source=attempt.price_source or "plan")
    if attempt.overhead_usd > 0:
        store.bill_until(attempt.job_name, attempt.number, seconds=end - attempt.started_at,
                         usd_per_s=attempt.overhead_usd / 3600.0, hourly_usd=attempt.overhead_usd, nodes=1,
                         spot=False, source=attempt.overhead_source, kind="controller")
    return store.spend(attempt.job_name)


def reprice(store: Store, attempt: AttemptRow, placement: Placement | None, overhead: Placement | None,
            pricer: Pricer, *, from_launch: bool = True) -> None:
    """Price what the provider says runs (``placement``) and the controller it keeps up (``overhead``),
    when either changed: what was metered so far stays at the old price (billed up to now first), the
    ledger lines from now on carry the new one and its source. Unknown instances keep the price."""
    update: dict[str, object] = {}
    if placement is not None and placement.key() != attempt.placement:
        price = pricer.price(placement)
        if price is not None:
            if attempt.billed_from is not None:
                meter(store, attempt, from_launch=from_launch)  # the seconds so far, at the price they had
            update.update(placement=placement.key(), price_source=price.source, hourly_usd=price.hourly_usd,
                          nodes=max(1, placement.nodes), spot=int(placement.spot))
    if overhead is not None and attempt.overhead_source is None:
        price = pricer.price(overhead)
        if price is not None:
            update.update(overhead_usd=price.hourly_usd, overhead_source=f"controller:{price.source}")
    if update:
        store.update_attempt(attempt.id, **update)
        for key, value in update.items():
            setattr(attempt, key, value)


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
