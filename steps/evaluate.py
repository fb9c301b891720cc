"""Measure a model: eval loss, perplexity, accuracy, latency, size, memory."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from itertools import repeat
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from optjob.specs import EvaluateStep
from torch import nn

from . import phases
from .context import StepContext, StepOutcome, StopFlag
from .data import IGNORE_INDEX, Corpus, MaskedCorpus
from .device import autocast, eval_mode, peak_memory_bytes, reset_peak_memory, synchronize
from .modeling import count_params, model_size_bytes, nonzero_params, param_bytes

PROMPT_TOKENS = 16


def perplexity(loss: float) -> float:
    """exp(loss), capped so it stays a finite JSON number."""
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("inf")


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    corpus: Corpus,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    stop: StopFlag | None = None,
) -> tuple[float, float]:
    """(mean next-token loss, next-token accuracy) over the eval split, token-weighted.

    A corpus with a loss mask (chat, prompt-completion: ``MaskedCorpus``) counts only the targets that
    carry loss in training (assistant replies, completions), so perplexity is the completions'.
    Per-batch sums stay on the device until the end: one sync per call."""
    losses: list[torch.Tensor] = []
    hits: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    batches = corpus.eval_batches(batch_size, max_batches)
    labels: Iterator[torch.Tensor | None] = (
        corpus.eval_labels(batch_size, max_batches) if isinstance(corpus, MaskedCorpus) else repeat(None)
    )
    shown = -(-corpus.eval_windows() // batch_size)  # batches, for the console's progress
    shown = shown if max_batches is None else min(shown, max_batches)
    with eval_mode(model):
        for batch, label in zip(batches, labels, strict=False):  # labels: repeat(None) when unmasked
            batch = batch.to(device, non_blocking=True)
            targets = batch[:, 1:] if label is None else label.to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            logits = logits.float()
            keep = targets != IGNORE_INDEX
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
            hits.append(((logits.argmax(-1) == targets) & keep).sum())
            counts.append(keep.sum())
            phases.update(len(counts), shown, "batches")
            if stop is not None:
                stop.check()
    count = int(torch.stack(counts).sum()) if counts else 0
    if count == 0:
        return float("nan"), float("nan")
    total = float(torch.stack(losses).cpu().double().sum())
    correct = int(torch.stack(hits).cpu().sum())
    return total / count, correct / count


#: Latency is timed for at least this long (small models: many runs, one median).
MIN_TIMED_S = 0.15
MAX_REPEAT_FACTOR = 10


def spread(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of ``times``: the IQR is the third quartile less the first
    (``statistics.quantiles``, inclusive method: 0 for a single run)."""
    if len(times) < 2:
        return (times[0] if times else float("nan")), 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1


def _timed_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, float]:
    """(median, IQR) of the wall time of ``fn`` in ms after two warm-up calls: at least ``repeats``
    runs, and more (up to ``MAX_REPEAT_FACTOR`` x) until :data:`MIN_TIMED_S` has passed -- five runs
    of a 10 ms forward on shared cores gave medians 50% apart for two models of the same shape."""
    fn()  # warm-up
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - started < MIN_TIMED_S
                                   and len(times) < repeats * MAX_REPEAT_FACTOR):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t) * 1000)
    return spread(times)


@torch.no_grad()
def _greedy(model: nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a KV cache, for models that have no ``generate``."""
    ids = prompt
    for _ in range(n):
        logits = model(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def latency(model: nn.Module, ctx: StepContext, repeats: int, new_tokens: int) -> dict[str, float]:
    """Median forward latency of one sequence, and of generating ``new_tokens`` greedily, each with its
    interquartile range over the repeats (``*_iqr``): the noise a difference between models must beat."""
    device = ctx.device
    seq = ctx.corpus.eval_ids[: ctx.corpus.seq_len][None].to(device)
    prompt = seq[:, :PROMPT_TOKENS]
    pad = getattr(ctx.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(ctx.tokenizer, "eos_token_id", None) or 0

    def forward() -> None:
        model(input_ids=seq, use_cache=False)

    def generate() -> None:
        if hasattr(model, "generate"):
            model.generate(  # type: ignore[operator]
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        else:
            _greedy(model, prompt, new_tokens)

    with eval_mode(model), torch.no_grad():
        fwd, fwd_iqr = _timed_ms(forward, repeats, device)
        gen, gen_iqr = _timed_ms(generate, repeats, device)
    return {"latency_ms": fwd, "latency_ms_iqr": fwd_iqr, "gen_latency_ms": gen, "gen_latency_ms_iqr": gen_iqr,
            "gen_tokens_per_s": new_tokens / (gen / 1000)}


def evaluate_model(
    ctx: StepContext,
    model: nn.Module,
    step: EvaluateStep | None = None,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """The metrics ``step.metrics`` asks for (default: perplexity, accuracy, latency, size), and
    ``task:NAME:METRIC`` for each of ``step.tasks`` (``steps.tasks``, lm-evaluation-harness).

    ``size_bytes`` is the saved model's size when ``model_dir`` is given, otherwise the
    bytes of its tensors in memory. ``peak_mem_bytes`` is always included where measurable."""
    step = step or EvaluateStep()
    wanted = set(step.metrics)
    metrics: dict[str, Any] = {}
    reset_peak_memory(ctx.device)
    if wanted & {"perplexity", "accuracy"}:
        loss, acc = eval_loss(model, ctx.corpus, step.batch_size, step.max_batches, ctx.device, stop=ctx.stop)
        metrics["eval_loss"] = loss
        if "perplexity" in wanted:
            metrics["perplexity"] = perplexity(loss)
        if "accuracy" in wanted:
            metrics["accuracy"] = acc
    if "latency" in wanted:
        phases.update(0, detail="timing latency")
        metrics.update(latency(model, ctx, step.latency_repeats, step.generate_tokens))
    if step.tasks:
        metrics.update(_tasks(ctx, model, step))
    if "size" in wanted:
        params = count_params(model)
        nonzero = nonzero_params(model)
        metrics["params"] = params
        metrics["nonzero_params"] = nonzero
        metrics["sparsity"] = 1.0 - nonzero / params if params else 0.0
        metrics["size_bytes"] = (
            model_size_bytes(model_dir) if model_dir is not None and Path(model_dir).is_dir() else param_bytes(model)
        )
    peak = peak_memory_bytes(ctx.device)
    if peak is not None:
        metrics["peak_mem_bytes"] = peak
    return metrics


#: Examples of each local task a dry run scores (its registry tasks it does not run: they need the network).
DRY_RUN_TASK_LIMIT = 4


def _tasks(ctx: StepContext, model: nn.Module, step: EvaluateStep) -> dict[str, float]:
    """``task:NAME:METRIC`` of each of ``step.tasks`` (``steps.tasks``). A dry run scores a few examples
    of each local task file and says (a ``check`` event, ``what: tasks``) which registry tasks it left
    to the real run: their datasets come from the Hugging Face Hub on the node."""
    from optjob.specs.evaltasks import is_task_file

    from .tasks import task_metrics  # lm-eval: imported only when tasks are asked for

    if ctx.dry_run:
        skipped = [t for t in step.tasks if not is_task_file(t)]
        if skipped:
            ctx.emit("check", what="tasks", ok=True, skipped=skipped,
                     detail="lm-eval registry tasks download their datasets on the node (it needs the network): "
                            "not run by a dry run")
        limit = min(step.task_limit or DRY_RUN_TASK_LIMIT, DRY_RUN_TASK_LIMIT)
        step = step.model_copy(update={"tasks": [t for t in step.tasks if is_task_file(t)], "task_limit": limit})
    phases.update(0, detail=f"lm-eval tasks: {', '.join(step.tasks)}")
    out = task_metrics(model, ctx.tokenizer, step)
    ctx.stop.check()
    return out


def run(ctx: StepContext, step: EvaluateStep, model: nn.Module) -> StepOutcome:
    metrics = evaluate_model(ctx, model, step, ctx.model_dir)
    ctx.emit("metrics", metrics=metrics)
    return StepOutcome(model=model, metrics=metrics)
