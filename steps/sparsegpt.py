"""SparseGPT: one-shot pruning with weight reconstruction (Frantar & Alistarh, 2023,
arXiv 2301.00774).

For one projection with weight ``W [out, in]`` and calibration inputs ``X``, the goal is
sparse ``W'`` minimising ``||W X - W' X||^2``. Its Hessian is ``H = 2 X X^T`` (here
``calibration.Hessian``), dampened by ``damp * mean(diag H)`` on the diagonal. Columns
are visited left to right; removing (or keeping) column ``i`` of a row is an OBS step:
the error ``(w - q) / [H^-1]_ii`` is spread over the columns not yet visited through row
``i`` of the upper Cholesky factor of ``H^-1`` (``Hinv``), the same for every output row,
which is what makes it fast. Updates are lazy: applied inside a block of ``block``
columns at once, and to the rest of the matrix once per block.

Mask selection is adaptive: at the start of each block the ``sparsity`` fraction of its
weights with the lowest ``w^2 / [Hinv]_ii^2`` (the OBS saliency, with the weights as
updated so far) is pruned; for an ``N:M`` pattern, at every ``M``-th column the ``N``
lowest of the next ``M`` columns of each row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import calibration, masks

#: Columns per lazy-update block (the paper's 128).
BLOCK = 128
#: Diagonal dampening as a fraction of the mean of diag(H) (the paper's 1%).
DAMP = 0.01


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, dead-column mask).

    ``H`` is copied; a column no input ever reached (zero diagonal) gets a 1 on the diagonal
    and is reported dead: its weights do not change the output on this data."""
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    lower = torch.linalg.cholesky(h)
    inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inv, upper=True), dead


@torch.no_grad()
def prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    block: int = BLOCK,
    damp: float = DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated ``[out, in]`` weight, mask with True where pruned)."""
    w = weight.clone().float()
    cols = w.shape[1]
    hinv, dead = inverse_factor(hessian, damp)
    w[:, dead] = 0
    nm = masks.parse_pattern(pattern)
    if nm is not None:
        block = max(nm[1], block - block % nm[1])  # whole N:M groups in each block
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        if nm is None:
            mask1 = masks.block_mask(w1**2 / diag[None, :] ** 2, sparsity)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i : i + nm[1]] ** 2 / diag[None, i : i + nm[1]] ** 2
                mask1[:, i : i + nm[1]] = masks.nm_mask(group, *nm)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[pruned] = 0  # exact zeros (the update above only touches later columns)
    return w, pruned


def prune_model(
    model: nn.Module,
    ids: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    device: torch.device | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    damp: float = DAMP,
) -> dict[str, torch.Tensor]:
    """Prune every decoder-layer projection of ``model`` in place on the calibration
    windows ``ids``; the masks (True: kept), by qualified module name."""
    def prune_one(w: torch.Tensor, stat: calibration.InputStat) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(stat, calibration.Hessian)
        if stat.rows:
            return prune_weight(w, stat.matrix(), sparsity, pattern, damp=damp)
        # no calibration token reached it (an unused expert): magnitude alone
        mask = masks.mask_for(w.abs(), sparsity, pattern)
        return w.masked_fill(mask, 0), mask

    return calibration.prune_sequentially(model, ids, pattern, calibration.Hessian, prune_one, device, on_layer)
