"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) and round-to-nearest (RTN), group-wise
asymmetric integer weights.

The grid: each output row's weights are cut into groups of ``group_size`` consecutive
inputs; a group of ``bits``-bit codes ``q in [0, 2^bits - 1]`` has a scale ``s`` and an
integer zero point ``z`` from its min and max (both widened to include 0, so a zero weight
stays exactly zero), and stands for ``s * (q - z)``. RTN rounds every weight to the
nearest point of that grid.

GPTQ quantizes the columns left to right and, like SparseGPT (``sparsegpt``), spreads each
column's rounding error ``(w - q) / [H^-1]_ii`` over the columns not yet quantized through
the upper Cholesky factor of the dampened inverse Hessian ``H = 2 X X^T``, with lazy
block updates. A group's scale and zero point are chosen when the pass reaches its first
column, from the weights as updated so far (the paper's "static groups" are not used;
act-order is not used, so groups stay contiguous). Weights that are exactly zero before
(a pruned model) are quantized to zero and their error compensated like any other, so
sparsity survives quantization (SparseGPT's joint sparse + quantized mode).

``Quantized`` holds the codes, scales and zero points a storage format needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from optjob.specs.errors import StepError
from torch import nn

from . import calibration, structure
from .sparsegpt import DAMP, inverse_factor

BLOCK = 128


@dataclass
class Quantized:
    """One ``[out, in]`` weight on a group-wise asymmetric grid."""

    codes: torch.Tensor  # [out, in] integers in [0, 2^bits - 1] (int16)
    scale: torch.Tensor  # [out, in / group_size]
    zero: torch.Tensor  # [out, in / group_size], integers in [0, 2^bits - 1] (int16)
    bits: int
    group_size: int
    #: ``||W - Q||^2`` and ``||W||^2`` against the weight as it was before (set by ``quantize_model``).
    sq_error: float = 0.0
    sq_norm: float = 0.0

    def dequantize(self) -> torch.Tensor:
        s = self.scale.repeat_interleave(self.group_size, dim=1)
        z = self.zero.repeat_interleave(self.group_size, dim=1)
        return s * (self.codes.float() - z.float())


def grid(x: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero point) per row of ``x [rows, group]``; the scale is rounded to
    ``scale_dtype`` (the dtype it is stored in) so the grid used is the grid stored."""
    maxq = 2**bits - 1
    lo = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values.clamp(min=0)
    flat = lo == hi  # an all-zero group
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
    tiny = torch.finfo(scale_dtype).tiny
    scale = ((hi - lo) / maxq).clamp(min=tiny).to(scale_dtype).float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``x [rows, k]`` on the grid of per-row ``scale`` and ``zero``."""
    return torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def _check(weight: torch.Tensor, group_size: int) -> None:
    if weight.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {weight.shape[1]} inputs")


def rtn(weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """Round to nearest, group-wise."""
    _check(weight, group_size)
    rows, cols = weight.shape
    groups = weight.float().reshape(rows * (cols // group_size), group_size)
    scale, zero = grid(groups, bits, scale_dtype)
    codes = encode(groups, scale, zero, bits)
    return Quantized(
        codes.reshape(rows, cols).to(torch.int16),
        scale.reshape(rows, -1),
        zero.reshape(rows, -1).to(torch.int16),
        bits,
        group_size,
    )


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float32,
    damp: float = DAMP,
) -> Quantized:
    """GPTQ of one ``[out, in]`` weight with the Hessian of its inputs."""
    _check(weight, group_size)
    w = weight.clone().float()
    rows, cols = w.shape
    zeros = w == 0
    hinv, dead = inverse_factor(hessian, damp)
    w[:, dead] = 0
    block = group_size * max(1, BLOCK // group_size)  # groups never straddle a block
    codes = torch.zeros_like(w, dtype=torch.int16)
    n_groups = cols // group_size
    scales = torch.zeros(rows, n_groups, device=w.device)
    zps = torch.zeros(rows, n_groups, device=w.device, dtype=torch.int16)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        scale = zero = torch.empty(0)
        for i in range(i2 - i1):
            c = i1 + i
            if c % group_size == 0:
                scale, zero = grid(w1[:, i : i + group_size], bits, scale_dtype)
                scales[:, c // group_size], zps[:, c // group_size] = scale, zero.to(torch.int16)
            col = w1[:, i]
            code = encode(col[:, None], scale, zero, bits)[:, 0]
            code = torch.where(zeros[:, c], zero, code)  # pruned weights stay zero
            q = scale * (code - zero)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
            codes[:, c] = code.to(torch.int16)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Quantized(codes, scales, zps, bits, group_size)


def quantize_model(
    model: nn.Module,
    ids: torch.Tensor | None,
    bits: int,
    group_size: int,
    device: torch.device | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    damp: float = DAMP,
) -> dict[str, Quantized]:
    """GPTQ (calibration windows ``ids``) or RTN (``ids`` None) of every decoder-layer
    projection; the weights in ``model`` become their dequantized values (so the next
    layer is calibrated on the quantized layer's outputs). The grids, by qualified module
    name."""
    layers_name, layers = structure.decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, module in calibration.projections(layer).items():
            if calibration.in_features(module) % group_size:
                raise StepError(
                    f"group_size {group_size} does not divide the {calibration.in_features(module)} "
                    f"inputs of {layers_name}.{i}.{name}",
                    hint="choose a group_size that divides every projection's input width",
                )
    out: dict[str, Quantized] = {}

    def compress(index: int, projs: dict[str, nn.Module], stats: dict[str, calibration.InputStat]) -> None:
        for name, module in projs.items():
            w = calibration.weight_of(module)
            weight: Any = module.weight
            dtype: torch.dtype = weight.dtype
            stat = stats.get(name)
            if isinstance(stat, calibration.Hessian) and stat.rows:
                q = quantize_weight(w, stat.matrix(), bits, group_size, dtype, damp)
            else:  # RTN, or a projection no calibration token reached
                q = rtn(w, bits, group_size, dtype)
            deq = q.dequantize()
            q.sq_error, q.sq_norm = float(((deq - w) ** 2).sum()), float((w**2).sum())
            calibration.set_weight(module, deq)
            out[f"{layers_name}.{index}.{name}"] = q

    if ids is None:
        for index, layer in enumerate(layers):
            compress(index, calibration.projections(layer), {})
            if on_layer is not None:
                on_layer(index, len(layers))
    else:
        calibration.sequential(model, ids, calibration.Hessian, compress, device, on_layer)
    return out
