"""Calibration records in the state store: after a run, its measured training throughput is
stored (``record_calibration``), so later plans of the same model size on the same accelerator read
it (``calibration_records``) instead of assuming the default efficiency. The throughput is stored as
full training's (6N FLOPs a token) at the run's FLOP rate, so a LoRA run calibrates a full one and
the other way round (``calibration.as_full_training``)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .. import paths
from ..store import Store

if TYPE_CHECKING:
    from ..plan import Plan


def calibration_records() -> list[Any]:
    """Finished runs' measured throughput, if this machine has a state store (never creates one)."""
    if not paths.db_path().exists():
        return []
    store = Store(paths.db_path())
    try:
        return list(store.calibration())
    finally:
        store.close()


def record_calibration(store: Store, name: str, plan: Plan) -> int:
    """One record per train step that reported throughput; returns how many were stored."""
    if plan.dry_run:
        return 0  # the proxy model is not the planned one
    from optjob.specs.steps import TrainOptions

    from .calibration import TRAIN_FLOPS_PER_PARAM, as_full_training
    from .estimate import adapter_share, compute_precision, model_params, train_flops_per_param

    job = store.job(name)
    if job is None:
        return 0
    spec = job.spec()
    params = model_params(spec.model)[0]
    accelerator = "cpu" if plan.local or not plan.chosen or not plan.chosen.accelerators else plan.chosen.accelerators
    by_step: dict[tuple[str | None, int], list[float]] = {}
    for _, e in store.events(name, kinds=("progress",)):
        if e.get("kind") == "train" and e.get("tokens_per_s") and e.get("step", 0) > 1:
            # A compare variant's step: its place in the variant's own pipeline (the trunk, then its steps).
            at = (len(spec.pipeline) + int(e.get("variant_step") or 0)) if e.get("variant") else int(e["index"])
            by_step.setdefault((e.get("variant"), at), []).append(float(e["tokens_per_s"]))
    stored = 0
    for (variant, index), values in by_step.items():
        if variant and variant not in spec.variants:
            continue
        pipeline = spec.variant_spec(variant).pipeline if variant else spec.pipeline
        if not 0 <= index < len(pipeline):
            continue  # an event of a spec that changed since: nothing to learn from it
        step = pipeline[index]
        # ``checkpoint`` is recorded as the dtype it ran in, so a later plan finds it under fp32 or bf16.
        precision = (compute_precision(step, spec.model) if isinstance(step, TrainOptions)
                     else getattr(step, "precision", "fp32"))
        # Per node: the estimator multiplies by the node count itself. A LoRA or gradient-checkpointed
        # run does other than 6N FLOPs a token: stored as the full training tokens/s of its FLOP rate.
        per_param = (train_flops_per_param(step, adapter_share(step, spec.model))
                     if isinstance(step, TrainOptions) else TRAIN_FLOPS_PER_PARAM)
        tps = as_full_training(statistics.median(values) / max(1, plan.nodes), per_param)
        store.add_calibration(name, accelerator, params, precision, tps)
        stored += 1
    return stored


