"""Efficiency calibration from finished runs: pure functions over plain records.

A record is what a finished train/distill run measured: ``(model_params, accelerator, tokens_per_s,
precision)``. ``accelerator`` is ``"cpu"``, a name (``"A100"``, one device) or ``"A100:8"`` (a node
of 8; ``tokens_per_s`` then covers all of them). Records may be tuples in that order, mappings or
``sqlite3.Row`` objects with those keys (optionally ``nodes``), or objects with those attributes.
Storage is the state store's business (``Store.add_calibration`` / ``Store.calibration``).

The efficiency of a run = achieved FLOP/s / peak FLOP/s = tokens/s x F x N / peak, with the peak at
the run's precision (so fp32 and bf16 runs calibrate the same number) and F the run's training FLOPs
per token per parameter (``flops_per_param``: 6 for full training; a LoRA run ~4 + 6 x its adapter's
share, gradient checkpointing +2; ``estimate.train_flops_per_param``). So a LoRA run calibrates the
same efficiency a full run of the same hardware would, and predicts one, and the other way round.
The state store keeps no F: ``calibration_store`` stores a run's tokens/s scaled to F = 6 (the full
training tokens/s of the same FLOP rate), the default F a record is read with.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .accelerators import node_peak_flops, normalize

#: Training FLOPs per token per parameter (forward 2N + backward 4N).
TRAIN_FLOPS_PER_PARAM = 6
#: Records count for a model whose parameter count is within this factor.
BUCKET_FACTOR = 2.0
_FIELDS = ("model_params", "accelerator", "tokens_per_s", "precision")
_OPTIONAL = ("nodes", "flops_per_param")


@dataclass(frozen=True)
class RunRecord:
    model_params: int
    accelerator: str
    tokens_per_s: float
    precision: str = "bf16"
    nodes: int = 1
    #: The run's training FLOPs per token per model parameter (6: full training).
    flops_per_param: float = TRAIN_FLOPS_PER_PARAM


def as_record(obj: Any) -> RunRecord | None:
    """Any accepted record shape -> :class:`RunRecord`; None if it is not one."""
    if isinstance(obj, RunRecord):
        return obj
    try:
        if isinstance(obj, Mapping) or hasattr(obj, "keys"):
            keys = set(obj.keys())
            values = [obj[k] if k in keys else None for k in (*_FIELDS, *_OPTIONAL)]
        elif isinstance(obj, (tuple, list)):
            values = [*obj[:6], *([None] * (6 - min(len(obj), 6)))]
        else:
            values = [getattr(obj, k, None) for k in (*_FIELDS, *_OPTIONAL)]
        params, acc, tps, precision, nodes, per_param = values
        if params is None or acc is None or tps is None:
            return None
        return RunRecord(int(params), str(acc), float(tps), str(precision or "bf16"),
                         int(nodes or 1), float(per_param or TRAIN_FLOPS_PER_PARAM))
    except (TypeError, ValueError, KeyError, IndexError):
        return None


def split_accelerator(text: str | None) -> tuple[str | None, int]:
    """``"A100:8"`` -> ("A100", 8); ``"A100"`` -> ("A100", 1); ``"cpu"``/None/"" -> (None, 1)."""
    if not text or text.strip().lower() == "cpu":
        return None, 1
    name, _, count = text.strip().partition(":")
    try:
        return name, max(1, int(float(count))) if count else 1
    except ValueError:
        return name, 1


def measured_efficiency(record: RunRecord) -> float:
    """Achieved / peak FLOP/s of one run, clamped to (0, 1]."""
    name, count = split_accelerator(record.accelerator)
    peak = node_peak_flops(name, count, record.precision) * max(record.nodes, 1)
    achieved = record.tokens_per_s * record.flops_per_param * record.model_params
    return min(1.0, max(1e-6, achieved / peak))


def same_size(a: int, b: int, factor: float = BUCKET_FACTOR) -> bool:
    return a > 0 and b > 0 and 1 / factor <= a / b <= factor


def matching(records: Iterable[Any], model_params: int, accelerator: str | None) -> list[RunRecord]:
    """Valid records measured on ``accelerator`` (a name, ``"cpu"`` or None for CPU) for a model
    within :data:`BUCKET_FACTOR` of ``model_params``."""
    want, _ = split_accelerator(accelerator)
    want_key = normalize(want) if want else None
    out = []
    for raw in records:
        rec = as_record(raw)
        if rec is None or rec.tokens_per_s <= 0:
            continue
        name, _ = split_accelerator(rec.accelerator)
        key = normalize(name) if name else None
        if key == want_key and same_size(rec.model_params, model_params):
            out.append(rec)
    return out


def calibrated_efficiency(records: Iterable[Any], model_params: int,
                          accelerator: str | None) -> tuple[float, int] | None:
    """(median measured efficiency, number of runs) for this accelerator and model size, or None
    when no finished run matches."""
    found = matching(records, model_params, accelerator)
    if not found:
        return None
    return statistics.median(measured_efficiency(r) for r in found), len(found)


def tokens_per_second(model_params: int, accelerator: str | None, efficiency: float,
                      precision: str = "bf16", nodes: int = 1,
                      flops_per_param: float = TRAIN_FLOPS_PER_PARAM) -> float:
    """The inverse: training tokens/s a node set should reach at ``efficiency`` (a run of
    ``flops_per_param`` FLOPs per token per parameter: 6 full, less for LoRA)."""
    name, count = split_accelerator(accelerator)
    peak = node_peak_flops(name, count, precision) * max(nodes, 1)
    return peak * efficiency / (flops_per_param * max(model_params, 1))


def as_full_training(tokens_per_s: float, flops_per_param: float) -> float:
    """A run's tokens/s at ``flops_per_param`` as the tokens/s full training (6N) reaches at the same
    FLOP rate: what the state store keeps (it has no column for the run's FLOPs)."""
    return tokens_per_s * flops_per_param / TRAIN_FLOPS_PER_PARAM
