"""The plan: a data value that ``optjob plan`` prints and ``optjob apply`` executes
(``planner.make_plan`` makes it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepPlan:
    index: int
    kind: str
    summary: str
    tokens: int | None = None
    est_seconds: float | None = None
    #: A ``compare`` variant's step: the variant and the step's place in it (``index`` is compare's).
    variant: str | None = None
    variant_step: int | None = None
    #: How a train/distill step's processes share it on the chosen offer: single, ddp or fsdp.
    strategy: str | None = None


@dataclass(frozen=True)
class VariantPlan:
    """One ``compare`` variant: its steps' estimated time and what that costs on the chosen offer."""

    name: str
    steps: int
    est_seconds: float | None = None
    est_usd: float | None = None


@dataclass(frozen=True)
class OfferPlan:
    cloud: str
    region: str | None
    instance_type: str | None
    accelerators: str | None
    spot: bool
    hourly_usd: float
    est_hours: float
    est_usd: float
    ondemand_usd: float | None = None
    #: The largest step's estimated peak memory per GPU (per process), GiB (``pricing.memory``).
    memory_gb: float | None = None
    #: Memory of one of the offer's GPUs, GiB (None: a CPU node, a TPU, or a GPU of unknown memory).
    gpu_memory_gb: float | None = None


@dataclass(frozen=True)
class ResourcesPlan:
    """The resources the plan asks for (the spec's, or this machine's under ``--local``)."""

    cloud: str
    accelerators: list[str] | None
    spot: bool | str
    region: str | None
    nodes: int
    hourly_usd: float | None


@dataclass(frozen=True)
class BudgetPlan:
    """The caps and the verdict: whether the cheapest way to complete fits them."""

    max_usd: float | None
    max_hours: float | None
    fits: bool = True
    over_by_usd: float = 0.0
    reason: str | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    spec_path: str | None
    provider: str  # "local" or "skypilot"
    local: bool  # runs on this machine (cloud: local, or apply --local)
    dry_run: bool
    resources: ResourcesPlan
    steps: tuple[StepPlan, ...]
    teardown: str
    storage: str | None
    budget: BudgetPlan
    offers: tuple[OfferPlan, ...] = ()
    chosen: OfferPlan | None = None
    notes: tuple[str, ...] = ()
    calibrated_runs: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)
    #: Values that did not come from the spec file: the user config's defaults, ``--set``, ``--name``.
    sources: tuple[str, ...] = ()
    #: The starting model as the plan sized it: params, layers, hidden, heads, kv_heads, vocab,
    #: family, dtype, and where that came from (model.init, config.json, a known hub model, a guess).
    model: dict[str, Any] = field(default_factory=dict)
    #: The ``compare`` step's variants, priced one by one (their steps are in ``steps`` too).
    variants: tuple[VariantPlan, ...] = ()

    @property
    def hourly_usd(self) -> float:
        """What one node-hour of the chosen resources costs (0 when unknown)."""
        return self.chosen.hourly_usd if self.chosen else 0.0

    @property
    def nodes(self) -> int:
        return self.resources.nodes

    @property
    def spot(self) -> bool:
        return bool(self.chosen.spot) if self.chosen else False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [asdict(s) for s in self.steps]
        d["variants"] = [asdict(v) for v in self.variants]
        d["offers"] = [asdict(o) for o in self.offers]
        d["chosen"] = asdict(self.chosen) if self.chosen else None
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=str)
