"""Calibration records in the state store: after a run, its measured training throughput is
stored (``record_calibration``), so later plans of the same model size on the same accelerator read
it (``calibration_records``) instead of assuming the default efficiency."""

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
    from .estimate import model_params

    job = store.job(name)
    if job is None:
        return 0
    spec = job.spec()
    params = model_params(spec.model)[0]
    accelerator = "cpu" if plan.local or not plan.chosen or not plan.chosen.accelerators else plan.chosen.accelerators
    by_step: dict[int, list[float]] = {}
    for _, e in store.events(name, kinds=("progress",)):
        if e.get("kind") == "train" and e.get("tokens_per_s") and e.get("step", 0) > 1:
            by_step.setdefault(int(e["index"]), []).append(float(e["tokens_per_s"]))
    stored = 0
    for index, values in by_step.items():
        step = spec.pipeline[index]
        precision = getattr(step, "precision", "fp32")
        # Per node: the estimator multiplies by the node count itself.
        tps = statistics.median(values) / max(1, plan.nodes)
        store.add_calibration(name, accelerator, params, precision, tps)
        stored += 1
    return stored


