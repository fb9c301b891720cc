"""Calibration for the one-shot methods (Wanda, SparseGPT, GPTQ): token windows from the
job's data, the statistics of each projection's inputs, and the layer-by-layer pass.

``windows`` draws ``samples`` random ``seq_len``-token windows from the train split (the
papers draw 128 random segments of their training corpus, C4; optjob uses the job's own
data). ``sequential`` then runs the model one decoder layer at a time, as the papers do:

1. the inputs of the first decoder layer are captured (a pre-hook on it stops the forward);
2. for each layer in turn, hooks on its projections (``nn.Linear``, gpt2's ``Conv1D``)
   feed every input row to a statistic (``InputNorms`` for Wanda, ``Hessian`` for
   SparseGPT and GPTQ) while the layer runs over all calibration windows;
3. ``compress(layer_index, {name: module}, {name: stat})`` changes the weights;
4. the layer runs again and its outputs, computed with the *compressed* weights, are the
   next layer's inputs, so each layer corrects for the error of the ones before it.

Only one layer's activations are held at a time (``samples x seq_len x hidden`` floats),
on the model's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from optjob.specs.errors import StepError
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import masks, structure
from .context import StepContext

#: Calibration windows per forward pass.
BATCH = 8
#: A dry run calibrates on at most this many windows.
DRY_RUN_SAMPLES = 8


def windows(train_ids: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[samples, seq_len]`` random windows of ``train_ids`` (seeded: same windows each run)."""
    high = len(train_ids) - seq_len
    if high < 1:
        raise StepError(
            f"calibration windows of {seq_len} tokens do not fit in the train split "
            f"({len(train_ids):,} tokens)",
            hint="set calibration.seq_len lower or give more data",
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, high, (samples,), generator=g)
    return train_ids[starts[:, None] + torch.arange(seq_len)]


def step_windows(ctx: StepContext, step: Any) -> torch.Tensor:
    """The calibration windows of a one-shot step (``step.calibration``: samples, seq_len
    (default: data.seq_len), seed) from the job's train split."""
    cal = step.calibration
    samples, seq_len, seed = cal.samples, cal.seq_len or ctx.corpus.seq_len, cal.seed
    if ctx.dry_run:  # the proxy: a few windows no longer than its data's
        samples, seq_len = min(samples, DRY_RUN_SAMPLES), min(seq_len, ctx.corpus.seq_len)
    return windows(ctx.corpus.train_ids, samples, seq_len, seed)


def progress(ctx: StepContext) -> Callable[[int, int], None]:
    """``on_layer`` for ``sequential``: a progress event per decoder layer (``phase:
    calibration``, no loss) and a stop check, so a signal or the deadline ends the step
    between layers."""

    def on_layer(index: int, total: int) -> None:
        ctx.emit("progress", step=index + 1, max_steps=total, phase="calibration")
        ctx.stop.check()

    return on_layer


# --------------------------------------------------------------------------- weights


def weight_of(module: nn.Module) -> torch.Tensor:
    """A projection's weight as a fp32 ``[out, in]`` copy (gpt2's Conv1D stores ``[in, out]``)."""
    w: Any = module.weight
    w = w.detach().float().clone()
    return w.t().contiguous() if isinstance(module, Conv1D) else w


@torch.no_grad()
def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write a ``[out, in]`` weight back, in the projection's own layout and dtype."""
    target: Any = module.weight
    target.copy_((w.t() if isinstance(module, Conv1D) else w).to(target.dtype))


def in_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` tensor (a mask) in the projection's own weight layout."""
    return t.t().contiguous() if isinstance(module, Conv1D) else t


def check_pattern(model: nn.Module, pattern: str) -> str:
    """Refuse an N:M ``pattern`` that does not tile every decoder-layer projection's inputs,
    before any work; the qualified name of the decoder layers."""
    name, layers = structure.decoder_layers(model)
    nm = masks.parse_pattern(pattern)
    if nm is not None:
        for i, layer in enumerate(layers):
            for proj_name, module in projections(layer).items():
                masks.check_width(f"{name}.{i}.{proj_name}", in_features(module), nm[1])
    return name


def projections(layer: nn.Module) -> dict[str, nn.Module]:
    """The projections of one decoder layer, by name within it."""
    return {n: m for n, m in layer.named_modules() if n and structure.is_projection(m)}


# --------------------------------------------------------------------------- statistics


class InputStat:
    """What a compression method needs to know about a projection's inputs."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.rows = 0  # input rows (tokens) seen

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class InputNorms(InputStat):
    """Per input feature j, the squared L2 norm over every token: ``||X_j||^2`` (Wanda)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        super().__init__(columns)
        self.sq = torch.zeros(columns, device=device, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).double()
        self.rows += x.shape[0]
        self.sq += (x * x).sum(0)

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt().float()


class Hessian(InputStat):
    """``H = 2 X^T X / n`` over every token (SparseGPT, GPTQ: the Hessian of the layer-wise
    squared error ``||W X - W' X||^2`` with respect to each row of ``W'``)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        super().__init__(columns)
        self.xtx = torch.zeros(columns, columns, device=device, dtype=torch.float32)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).float()
        self.rows += x.shape[0]
        self.xtx.addmm_(x.t(), x)

    def matrix(self) -> torch.Tensor:
        return 2 * self.xtx / max(self.rows, 1)


# --------------------------------------------------------------------------- the pass


@dataclass
class _Call:
    """One captured call of a decoder layer: hidden states and the rest of its arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Captured(Exception):
    """Raised by the pre-hook on the first decoder layer: the rest of the forward is not needed."""


def _first_layer_calls(model: nn.Module, layer: nn.Module, ids: torch.Tensor, device: torch.device) -> list[_Call]:
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        calls.append(_Call(hidden.detach(), rest, dict(kwargs)))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH].to(device)
            with contextlib.suppress(_Captured):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    if len(calls) != (len(ids) + BATCH - 1) // BATCH:
        raise StepError("calibration: the model's forward did not reach its first decoder layer")
    return calls


def _run(layer: nn.Module, call: _Call) -> torch.Tensor:
    out = layer(call.hidden, *call.args, **call.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.detach()  # type: ignore[no-any-return]


Compress = Callable[[int, dict[str, nn.Module], dict[str, Any]], None]


@torch.no_grad()
def sequential(
    model: nn.Module,
    ids: torch.Tensor,
    make_stat: Callable[[int, torch.device], InputStat],
    compress: Compress,
    device: torch.device | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> None:
    """Compress ``model`` one decoder layer at a time on the calibration windows ``ids``
    (see the module docstring). ``make_stat(columns, device)`` builds each projection's
    statistic; ``on_layer(index, total)`` is called after each layer (progress, stop checks)."""
    if device is None:
        device = next(model.parameters()).device
    _, layers = structure.decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        calls = _first_layer_calls(model, layers[0], ids, device)
        for index, layer in enumerate(layers):
            projs = projections(layer)
            stats = {name: make_stat(in_features(m), device) for name, m in projs.items()}
            handles = [m.register_forward_hook(_feeder(stats[name])) for name, m in projs.items()]
            try:
                for call in calls:
                    _run(layer, call)
            finally:
                for h in handles:
                    h.remove()
            compress(index, projs, stats)
            for call in calls:
                call.hidden = _run(layer, call)
            if on_layer is not None:
                on_layer(index, len(layers))
    finally:
        model.train(was_training)


def in_features(module: nn.Module) -> int:
    w: Any = module.weight
    return int(w.shape[0] if isinstance(module, Conv1D) else w.shape[1])


def _feeder(stat: InputStat) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        stat.add(inputs[0].detach())

    return hook


def prune_sequentially(
    model: nn.Module,
    ids: torch.Tensor,
    pattern: str,
    make_stat: Callable[[int, torch.device], InputStat],
    prune_one: Callable[[torch.Tensor, InputStat], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The one-shot pruners' shared pass: every decoder-layer projection of ``model`` is pruned in
    place, layer by layer on the calibration windows ``ids``, by ``prune_one(weight, statistic) ->
    (new weight, mask of pruned entries)``. Returns the masks (True: kept), by qualified module name."""
    layers_name = check_pattern(model, pattern)
    kept: dict[str, torch.Tensor] = {}

    def compress(index: int, projs: dict[str, nn.Module], stats: dict[str, InputStat]) -> None:
        for name, module in projs.items():
            new, mask = prune_one(weight_of(module), stats[name])
            set_weight(module, new)
            kept[f"{layers_name}.{index}.{name}"] = in_layout(module, ~mask)

    sequential(model, ids, make_stat, compress, device, on_layer)
    return kept
