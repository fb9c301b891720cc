"""``make_plan``: decide where a spec runs (provider, offer), what each step will do, what it
should cost, and whether that fits the budget. Pure apart from reading the price catalog and the
calibration records; ``controller`` takes the plan as it is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from optjob.specs import JobSpec
from optjob.specs.steps import (
    DistillStep,
    EvaluateStep,
    HpoStep,
    PruneStep,
    QuantizeStep,
    StepBase,
    TrainOptions,
)

from .plan import BudgetPlan, OfferPlan, Plan, ResourcesPlan, StepPlan


def summarize_step(step: StepBase, seq_len: int) -> tuple[str, int | None]:
    """One line saying what a step will do, and the tokens it processes."""
    if isinstance(step, DistillStep):
        s = step.student.model_dump(exclude_none=True)
        return (f"{step.max_steps} steps into student {s or 'same shape'} (init {step.init}, "
                f"T={step.temperature}, alpha={step.alpha})", step.tokens(seq_len))
    if isinstance(step, TrainOptions):
        return (f"{step.max_steps} steps, lr {step.lr:g}, batch {step.batch_size}x{step.grad_accum}, "
                f"{step.optimizer}/{step.schedule}, {step.precision}", step.tokens(seq_len))
    if isinstance(step, HpoStep):
        return (f"{step.trials} trials x {step.trial_steps} steps, {step.sampler}, {step.direction} "
                f"{step.metric} over {', '.join(step.space)}", None)
    if isinstance(step, PruneStep):
        what = (f"magnitude {step.sparsity:.0%}" if step.method == "magnitude"
                else f"structured mlp {step.mlp_fraction:.0%} heads {step.heads_fraction:.0%}")
        rec = f", {step.recover_steps} recovery steps" if step.recover_steps else ""
        return what + rec, step.recover_steps * step.batch_size * seq_len or None
    if isinstance(step, QuantizeStep):
        return step.method, None
    if isinstance(step, EvaluateStep):
        return ", ".join(step.metrics), None
    return step.kind, None


def resources_summary(spec: JobSpec, local: bool) -> ResourcesPlan:
    r = spec.resources
    return ResourcesPlan(
        cloud="local" if local else r.cloud,
        accelerators=None if local else [f"{n}:{c}" for n, c in r.accelerator_choices] or None,
        spot=False if local else r.spot,
        region=None if local else r.region,
        nodes=1 if local else r.nodes,
        hourly_usd=r.hourly_usd,
    )


def make_plan(spec: JobSpec, spec_path: str | Path | None = None, *, local: bool = False,
              dry_run: bool = False) -> Plan:
    """Decide how ``spec`` runs. ``local`` forces this machine whatever ``resources.cloud`` says."""
    from .pricing.plan_pricing import price_plan  # the catalog reader; plain Python, no sky

    local = local or dry_run or spec.resources.cloud == "local"
    warnings: list[str] = []
    if local and spec.resources.cloud != "local" and not dry_run:
        warnings.append(f"--local: running on this machine, ignoring resources.cloud={spec.resources.cloud}"
                        + (" and its accelerators" if spec.resources.accelerators else ""))
    steps = []
    for i, step in enumerate(spec.pipeline):
        summary, tokens = summarize_step(step, spec.data.seq_len)
        steps.append(StepPlan(i, step.kind, summary, tokens))
    base = Plan(
        name=spec.name, spec_path=str(spec_path) if spec_path else None,
        provider="local" if local else "skypilot", local=local, dry_run=dry_run,
        resources=resources_summary(spec, local), steps=tuple(steps), teardown=spec.teardown,
        storage=spec.storage.artifacts,
        budget=BudgetPlan(spec.budget.max_usd, spec.budget.max_hours),
        warnings=tuple(warnings),
    )
    if dry_run:
        # The rehearsal runs a tiny proxy on this machine at no charge: no offers, no cap.
        free = OfferPlan(cloud="local", region=None, instance_type=None, accelerators=None, spot=False,
                         hourly_usd=0.0, est_hours=0.0, est_usd=0.0)
        return replace(base, offers=(free,), chosen=free,
                       budget=BudgetPlan(None, None),
                       notes=("dry run: every step capped to a few optimizer steps on a 2-layer, 64-wide proxy",))
    return price_plan(spec, base)
