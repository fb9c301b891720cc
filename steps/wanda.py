"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv 2306.11695).

The score of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, the norm of input feature
``j`` over every calibration token; within each output row ``i`` the lowest-scoring
``sparsity`` fraction is zeroed (the paper's per-output comparison group), or, for an
``N:M`` pattern, the ``N`` lowest of every ``M`` consecutive inputs. No weight update, no
retraining. Layers are pruned one after another (``calibration.sequential``), each
seeing the outputs of the pruned layers before it, as the paper's code does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import calibration, masks


def scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` for a ``[out, in]`` weight and the input norms ``[in]``."""
    return weight.abs() * norms[None, :]


def prune_weight(weight: torch.Tensor, norms: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """The pruning mask (True: pruned) of one ``[out, in]`` weight."""
    return masks.mask_for(scores(weight, norms), sparsity, pattern)


def prune_model(
    model: nn.Module,
    ids: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    device: torch.device | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every decoder-layer projection of ``model`` in place on the calibration
    windows ``ids``; the masks (True: kept), by qualified module name."""
    def prune_one(w: torch.Tensor, stat: calibration.InputStat) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(stat, calibration.InputNorms)
        # a projection no calibration token reached (an unused expert): magnitude alone
        norms = stat.norms() if stat.rows else torch.ones(w.shape[1], device=w.device)
        mask = prune_weight(w, norms, sparsity, pattern)
        return w.masked_fill(mask, 0), mask

    return calibration.prune_sequentially(model, ids, pattern, calibration.InputNorms, prune_one, device, on_layer)
