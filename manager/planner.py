"""``make_plan``: decide where a spec runs (provider, offer), what each step will do, what it
should cost, and whether that fits the budget. Pure apart from reading the price catalog and the
calibration records; ``controller`` takes the plan as it is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from optjob.specs import JobSpec
from optjob.specs.steps import (
    Calibration,
    DistillStep,
    EvaluateStep,
    HpoStep,
    PruneStep,
    QuantizeStep,
    StepBase,
    TrainOptions,
)

from .plan import BudgetPlan, OfferPlan, Plan, ResourcesPlan, StepPlan, VariantPlan


def tuned_by_hpo(pipeline: list[StepBase]) -> dict[int, tuple[int, list[str]]]:
    """{index of a train/distill step: (index of the hpo step that sets its values, the fields it
    sets)}: ``train.lr`` -> ``lr``, ``model.init.layers`` stays whole."""
    out: dict[int, tuple[int, list[str]]] = {}
    for h, step in enumerate(pipeline):
        if isinstance(step, HpoStep):
            j = next((j for j in range(h + 1, len(pipeline)) if not isinstance(pipeline[j], EvaluateStep)), None)
            if j is not None:
                out[j] = (h, [k if k.startswith("model.init.") else k.partition(".")[2] for k in step.space])
    return out


def summarize_step(step: StepBase, seq_len: int, tuned: tuple[int, list[str]] | None = None
                   ) -> tuple[str, int | None]:
    """One line saying what a step will do, and the tokens it processes. ``tuned``: the hpo step
    before it and the fields that one will set (shown as such, not as the spec's fixed values)."""
    by, fields = tuned if tuned else (None, [])

    def val(field: str, label: str, fixed: str) -> str:
        return f"{label} from hpo (step {by})" if field in fields else fixed

    rest = [f for f in fields if f not in ("max_steps", "lr", "batch_size", "temperature", "alpha")]
    sets = f"; hpo (step {by}) also sets {', '.join(rest)}" if rest else ""
    if isinstance(step, DistillStep):
        s = step.student.model_dump(exclude_none=True)
        shape = ", ".join(f"{k} {v}" for k, v in s.items()) or "same shape"
        return (f"{val('max_steps', 'steps', f'{step.max_steps} steps')} into a student of {shape} "
                f"(init {step.init}, {val('temperature', 'T', f'T={step.temperature}')}, "
                f"{val('alpha', 'alpha', f'alpha={step.alpha}')}){sets}", step.tokens(seq_len))
    if isinstance(step, TrainOptions):
        return (f"{val('max_steps', 'steps', f'{step.max_steps} steps')}, {val('lr', 'lr', f'lr {step.lr:g}')}, "
                f"{val('batch_size', 'batch', f'batch {step.batch_size}')}x{step.grad_accum}, "
                f"{step.optimizer}/{step.schedule}, {step.precision}{sets}", step.tokens(seq_len))
    if isinstance(step, HpoStep):
        return (f"{step.trials} trials x {step.trial_steps} steps, {step.sampler}, {step.direction} "
                f"{step.metric} over {', '.join(step.space)}", None)
    if isinstance(step, PruneStep):
        if step.method == "structured":
            what = f"structured mlp {step.mlp_fraction:.0%} heads {step.heads_fraction:.0%}"
        else:
            what = f"{step.method} " + (step.pattern if step.pattern != "unstructured" else f"{step.sparsity:.0%}")
        calib = _calibration(step.calibration, seq_len) if step.method in ("wanda", "sparsegpt") else ""
        rec = f", {step.recover_steps} recovery steps" if step.recover_steps else ""
        return what + calib + rec, step.recover_steps * step.batch_size * seq_len or None
    if isinstance(step, QuantizeStep):
        if step.method in ("gptq", "rtn"):
            calib = _calibration(step.calibration, seq_len) if step.method == "gptq" else ""
            return f"{step.method} int{step.bits} group {step.group_size}{calib}", None
        return step.method, None
    if isinstance(step, EvaluateStep):
        return ", ".join(step.metrics), None
    return step.kind, None


def _calibration(cal: Calibration, seq_len: int) -> str:
    return f", calibrated on {cal.samples} x {cal.seq_len or seq_len} tokens"


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
    if not dry_run:
        import os

        from optjob.providers.sky_task import check_outputs_kept, require_secrets

        require_secrets(spec, os.environ)  # a secret the launch would lack: one line now, not on the node
        if not local:
            check_outputs_kept(spec)
    warnings: list[str] = []
    if not local and not dry_run and not spec.storage.artifacts:
        warnings.append("no storage.artifacts: the job folder (results, final model, logs) is copied home from the "
                        "cluster before teardown; checkpoints are not kept, so a lost node starts over")
    if local and spec.resources.cloud != "local" and not dry_run:
        warnings.append(f"--local: running on this machine, ignoring resources.cloud={spec.resources.cloud}"
                        + (" and its accelerators" if spec.resources.accelerators else ""))
    model, config = describe_model(spec, spec_path)
    refuse_unsupported(spec, config, spec_path)
    steps = []
    tuned = tuned_by_hpo(spec.pipeline)
    for i, step in enumerate(spec.pipeline):
        summary, tokens = summarize_step(step, spec.data.seq_len, tuned.get(i))
        steps.append(StepPlan(i, step.kind, summary, tokens))
    at = len(spec.pipeline)
    for name, variant in spec.variants.items():  # each compare variant's steps, from the model before compare
        for j, step in enumerate(variant):
            summary, tokens = summarize_step(step, spec.data.seq_len)
            steps.append(StepPlan(at, step.kind, summary, tokens, variant=name, variant_step=j))
    base = Plan(
        name=spec.name, spec_path=str(spec_path) if spec_path else None,
        provider="local" if local else "skypilot", local=local, dry_run=dry_run,
        resources=resources_summary(spec, local), steps=tuple(steps), teardown=spec.teardown,
        storage=spec.storage.artifacts,
        budget=BudgetPlan(spec.budget.max_usd, spec.budget.max_hours),
        warnings=tuple(warnings), model=model,
        variants=tuple(VariantPlan(name, len(v)) for name, v in spec.variants.items()),
    )
    if dry_run:
        # The rehearsal runs a tiny proxy on this machine at no charge: no offers, no cap.
        free = OfferPlan(cloud="local", region=None, instance_type=None, accelerators=None, spot=False,
                         hourly_usd=0.0, est_hours=0.0, est_usd=0.0)
        return replace(base, offers=(free,), chosen=free,
                       budget=BudgetPlan(None, None),
                       notes=("dry run: every step capped to a few optimizer steps on a 2-layer, 64-wide proxy",))
    folder = local_model(spec, spec_path)
    if folder is not None:  # the estimate reads the folder's config.json where apply will find it
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"path": str(folder)})})
    return with_strategies(spec, price_plan(spec, base))


def with_strategies(spec: JobSpec, plan: Plan) -> Plan:
    """``plan`` with each train/distill step's strategy on the chosen offer (``pricing.memory``:
    fsdp where the step fits the GPUs only sharded), in its summary and its ``strategy``."""
    from .pricing.memory import offer_strategies

    if plan.chosen is None:
        return plan
    chosen = offer_strategies(spec, plan.chosen.accelerators, local=plan.local)
    steps = tuple(replace(s, strategy=chosen[s.index],
                          summary=s.summary + (f", strategy {chosen[s.index]}" if chosen[s.index] != "single" else ""))
                  if s.variant is None and s.index in chosen else s for s in plan.steps)
    return replace(plan, steps=steps)


def resolved_spec(spec: JobSpec, plan: Plan) -> JobSpec:
    """``spec`` with the strategy the plan picked for a train step written in (``train.strategy: fsdp``
    where it was left to the plan), as the workload must run it: job.json is written from this."""
    picked = {s.index for s in plan.steps if s.variant is None and s.strategy == "fsdp"}
    pipeline = spec.pipeline
    if not any(getattr(pipeline[i], "strategy", "x") is None for i in picked):
        return spec
    data = spec.model_dump(mode="json")
    for i in picked:
        (body,) = data["steps"][i].values()
        body["strategy"] = "fsdp"
    return type(spec).model_validate(data)


def local_model(spec: JobSpec, spec_path: str | Path | None) -> Path | None:
    """``model.path`` resolved as apply resolves it: relative to the spec's folder."""
    if spec.model.path is None:
        return None
    path = Path(spec.model.path).expanduser()
    if not path.is_absolute() and spec_path is not None:
        path = Path(spec_path).parent / path
    return path


def describe_model(spec: JobSpec, spec_path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(``plan.model``, the model's config for the family checks, or None when only guessed). A local
    folder's ``config.json`` is read (no weights); ``model.init`` and known hub ids need no file."""
    import json

    from .pricing.model_shape import KNOWN_SHAPES, model_shape

    folder = local_model(spec, spec_path)
    model = spec.model.model_copy(update={"path": str(folder)}) if folder is not None else spec.model
    shape, note = model_shape(model)
    raw: dict[str, Any] | None = None
    if folder is not None:
        try:
            loaded = json.loads((folder / "config.json").read_text())
            raw = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            raw = None
    source = ("model.init" if spec.model.init is not None else "config.json" if raw is not None
              else "known hub model" if (spec.model.hf or "").lower() in KNOWN_SHAPES else "assumed")
    described = {"params": shape.params, "layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads,
                 "kv_heads": shape.kv_heads, "intermediate": shape.intermediate, "vocab": shape.vocab,
                 "family": shape.family, "dtype": {4: "float32", 2: "16-bit"}.get(int(shape.dtype_bytes), "?"),
                 "tied": shape.tied, "source": source, "note": note}
    if raw is None and source == "assumed":
        return described, None
    config = raw or {"model_type": shape.family, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
                     "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
                     "intermediate_size": shape.intermediate, "vocab_size": shape.vocab,
                     "tie_word_embeddings": shape.tied}
    return described, config


def refuse_unsupported(spec: JobSpec, config: dict[str, Any] | None, spec_path: str | Path | None) -> None:
    """A step the model cannot take (``steps.families``: decided from its config alone) is refused
    here, before anything is paid for, with a hint that fits the step."""
    if config is None:
        return
    from optjob.specs.errors import SpecError
    from optjob.steps.families import unsupported

    located = [(f"steps[{i}]", step) for i, step in enumerate(spec.pipeline)]
    located += [(f"steps[{len(spec.pipeline)}].compare.{name}[{j}]", step)
                for name, variant in spec.variants.items() for j, step in enumerate(variant)]
    for where, step in located:
        found = unsupported(config, step)
        if found is not None:
            raise SpecError(f"{spec_path or '<spec>'}: {where}.{step.kind}: {found}")
