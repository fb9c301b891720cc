"""Pricing: what a spec costs to complete, and on which offer.

::

    from optjob.manager.pricing import load_catalog, find_offers, plan_offers

    catalog = load_catalog()  # $OPTJOB_CATALOG_DIR, ~/.sky/catalogs/v8, or the bundled snapshot
    offers = find_offers(spec.resources, catalog)
    estimates, choice = plan_offers(spec, offers, calibration=store.calibration())
    choice.chosen, choice.fits, choice.over_by_usd, choice.reason

Nothing here imports boto3 at module level (``spot_live`` does, lazily) nor torch/sky.
"""

from .accelerators import CPU_TFLOPS, node_peak_flops, peak_tflops
from .calibration import RunRecord, calibrated_efficiency, tokens_per_second
from .catalog import SUPPORTED_CLOUDS, Catalog, CatalogRow
from .estimate import (
    DEFAULT_EFFICIENCY,
    Estimate,
    StepEstimate,
    estimate,
    model_params,
    plan_offers,
    workload,
)
from .offers import Offer, PlanChoice, choose, find_offers
from .snapshot import build_snapshot, load_snapshot
from .sources import catalog_dir, current_catalog, load_catalog, refresh

__all__ = [
    "CPU_TFLOPS",
    "DEFAULT_EFFICIENCY",
    "SUPPORTED_CLOUDS",
    "Catalog",
    "CatalogRow",
    "Estimate",
    "Offer",
    "PlanChoice",
    "RunRecord",
    "StepEstimate",
    "build_snapshot",
    "calibrated_efficiency",
    "catalog_dir",
    "choose",
    "current_catalog",
    "estimate",
    "find_offers",
    "load_catalog",
    "load_snapshot",
    "model_params",
    "node_peak_flops",
    "peak_tflops",
    "plan_offers",
    "refresh",
    "tokens_per_second",
    "workload",
]
