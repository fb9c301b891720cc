"""Sparsity patterns: which weights a score says to prune.

A mask here is a bool tensor the shape of a ``[out, in]`` weight, True where the weight is
pruned (set to zero). ``pattern`` is ``"unstructured"`` or ``"N:M"`` (N of every M
consecutive input weights of each output row are pruned: ``"2:4"`` is the semi-structured
sparsity NVIDIA's sparse tensor cores run).
"""

from __future__ import annotations

import torch
from optjob.specs.errors import StepError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``(N, M)`` of an ``"N:M"`` pattern; None for unstructured."""
    if pattern == "unstructured":
        return None
    try:
        n_text, m_text = pattern.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise StepError(f"unknown sparsity pattern {pattern!r}: use unstructured or N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise StepError(f"sparsity pattern {pattern!r}: N must be between 1 and M - 1")
    return n, m


def check_width(name: str, columns: int, m: int) -> None:
    if columns % m:
        raise StepError(
            f"{name} has {columns} inputs, not a multiple of {m}: an N:{m} pattern cannot tile it",
            hint="use pattern: unstructured",
        )


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in * sparsity)`` lowest-scoring weights of every output row."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest-scoring weights of every ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * sparsity)`` lowest-scoring weights of the whole block."""
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def mask_for(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Per-output-row mask (unstructured) or the N:M mask of ``pattern``."""
    nm = parse_pattern(pattern)
    if nm is None:
        return row_mask(scores, sparsity)
    return nm_mask(scores, *nm)
