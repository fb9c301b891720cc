"""The training loop every optimizer-running step uses, and the ``train`` step itself.

Resume is exact: a batch is a pure function of (seed, step), dropout is reseeded
from (seed, step), and a checkpoint holds the model, optimizer, scheduler, grad
scaler and RNG states. A run stopped and resumed ends with the same weights as a
straight one.

Distributed (``distributed=True`` under torchrun, see ``dist``): ``batch_size`` is the
global batch per micro-step; every rank draws the same global batch and trains on its
own block of ``batch_size / world`` rows, the model is wrapped in DDP (gradients are
averaged over the ranks), and the reported loss is the mean over the ranks -- the loss
one process would report for the same global batch. Only rank 0 emits events and
writes checkpoints; every rank resumes from rank 0's checkpoint. Each rank draws its
own dropout masks, so without dropout a run matches one process up to float rounding
(and a checkpoint resumes with any number of processes the batch splits among).

``strategy: fsdp`` shards the model instead of wrapping it in DDP (``fsdp``: weights, gradients and
optimizer state split among the ranks); the batch, the losses and the checkpoints (full, unsharded,
written by rank 0) are as under DDP, and the step ends with the whole model on every rank."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from optjob.specs import TrainOptions, TrainStep
from optjob.specs.errors import StepError
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from . import adapters, dist, fsdp, phases
from . import checkpoint as ckpt
from .context import StepContext, StepOutcome, StopRequested
from .data import IGNORE_INDEX, MaskedCorpus
from .device import autocast, autocast_dtype, mark_step
from .evaluate import eval_loss, perplexity

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
#: Where ``torch.optim.AdamW(fused=True)`` has a kernel, and for which parameter types.
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Most points kept in results.json's loss curve.
CURVE_POINTS = 500


@dataclass
class TrainResult:
    model: nn.Module
    steps_done: int
    #: (step, loss) for every optimizer step, across resumes.
    losses: list[tuple[int, float]]
    tokens_per_s: float
    wall_s: float
    stopped: str | None
    early_stopped: bool
    best_eval_loss: float | None
    #: (step, eval_loss) of each periodic evaluation.
    evals: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None
    #: The upcast to fp32 master weights, if the model came in another dtype.
    upcast: dict[str, Any] | None = None
    #: The dtype(s) of the weights the optimizer updated ("float32", "bfloat16", ...).
    weights_dtype: str | None = None
    #: How the processes shared the work: "single" (one process), "ddp" or "fsdp".
    strategy: str = "single"


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch[:, :-1]`` predicting ``batch[:, 1:]``."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def masked_lm_loss(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets whose label is not -100 (``labels`` is
    ``batch[:, 1:]`` with prompt tokens masked); 0, with a gradient, when every one is masked."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


#: The label of a target that carries no loss (a prompt token of chat / prompt-completion data).
IGNORE = IGNORE_INDEX


def corpus_eval_loss(
    model: nn.Module, corpus: Any, batch_size: int, max_batches: int | None, device: torch.device,
    *, dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """(loss, accuracy) on the eval split: over every token, or for a corpus with a loss mask (chat,
    prompt-completion) over the completion tokens only (``evaluate.eval_loss`` does both)."""
    return eval_loss(model, corpus, batch_size, max_batches, device, dtype=dtype)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer in the backward pass (transformers' non-reentrant checkpointing)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise StepError(f"{type(model).__name__} does not support gradient_checkpointing")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Schedule:
    """Linear warmup, then cosine/linear decay to 0 or constant (a LambdaLR factor)."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


#: The dtype training keeps its weights in (the optimizer's master copy). ``precision`` fp32, bf16 and
#: fp16 keep fp32 weights (bf16/fp16 matmuls under autocast); ``checkpoint`` keeps the model's own dtype.
MASTER_DTYPE = torch.float32


def to_master_weights(model: nn.Module, precision: str = "fp32") -> dict[str, Any] | None:
    """Upcast ``model``'s floating-point parameters and buffers to fp32 in place when any
    parameter is in another dtype (a bf16/fp16 checkpoint): optimizer steps on bf16
    weights lose most small updates, and fp16 ones overflow. ``precision`` only chooses
    the autocast dtype; ``checkpoint`` keeps the weights in the dtype they came in (no upcast).
    Returns what was converted (None: nothing), for the metrics."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != MASTER_DTYPE:
            name = str(p.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + p.numel()
    if not counts:
        return None
    if precision == "checkpoint":
        print(
            f"precision checkpoint: training {sum(counts.values())} {'/'.join(sorted(counts))} parameters in "
            "their own dtype (no fp32 master weights: updates below the dtype's resolution are lost"
            + ("; fp16 runs without loss scaling and may overflow" if "float16" in counts else "") + ")",
            file=sys.stderr,
            flush=True,
        )
        return None
    model.to(MASTER_DTYPE)
    note: dict[str, Any] = {
        "from": sorted(counts),
        "to": str(MASTER_DTYPE).removeprefix("torch."),
        "params": sum(counts.values()),
        "precision": precision,
    }
    print(
        f"training in fp32 master weights: upcast {note['params']} {'/'.join(note['from'])} "
        f"parameters (precision {precision} runs under autocast)",
        file=sys.stderr,
        flush=True,
    )
    return note


def trained_dtype(model: nn.Module) -> str | None:
    """The dtype(s) of ``model``'s trainable parameters, "/"-joined ("float32", "bfloat16")."""
    found = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return "/".join(found) or None


def make_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    """AdamW, SGD or RMSprop; weight decay on matrices only (not norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise StepError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": opts.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if opts.optimizer == "adamw":
        # The fused kernel (one pass per tensor instead of a dozen elementwise ops) where torch has
        # one: CPU and CUDA. It is Trainer's default since torch 2.8 too (adamw_torch_fused).
        fused = all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params)
        return torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas, fused=fused or None)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)
    return torch.optim.RMSprop(groups, lr=opts.lr, momentum=opts.momentum)


def train_loop(
    ctx: StepContext,
    model: nn.Module,
    opts: TrainOptions,
    *,
    loss_fn: LossFn | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    checkpoint_dir: Path | None = None,
    emit: bool = True,
    report: Callable[[int, float], None] | None = None,
    checkpoints: bool = True,
    on_stop: Literal["raise", "return"] = "raise",
    distributed: bool = False,
) -> TrainResult:
    """Run ``opts.max_steps`` optimizer steps on ``ctx.corpus`` (resuming from the newest
    valid checkpoint in ``checkpoint_dir``, default ``ctx.step_dir()/checkpoints``).

    ``checkpoints=False`` writes and reads none (hpo trials); ``emit=False`` emits no
    events. On a stop request (signal, deadline) the loop finishes the optimizer step,
    checkpoints, and raises ``StopRequested`` (``on_stop="return"``: returns a result
    with ``stopped`` set instead).

    ``distributed=True``: every rank of a torchrun job calls this together and trains
    with DDP (a no-op in a single process); see the module docstring."""
    started = time.perf_counter()
    device, corpus = ctx.device, ctx.corpus
    ddp = distributed and dist.world() > 1
    if ddp:
        dist.split_batch(opts.batch_size)  # a clear error before any work
    main = not ddp or dist.is_main()
    emit = emit and main
    # FSDP (``train.strategy: fsdp``, see ``fsdp``): weights, gradients and optimizer state sharded.
    sharded = ddp and getattr(opts, "strategy", None) == "fsdp"
    if sharded and (loss_fn is not None or adapters.adapter_of(opts) is not None or opts.precision == "fp16"):
        raise StepError("strategy fsdp trains a plain model (no adapter, no distillation, no fp16): use ddp")
    # Chat / prompt-completion data carry a loss mask, which the default loss honours (a custom
    # loss, distillation's, sees the tokens alone).
    masked = corpus if loss_fn is None and isinstance(corpus, MaskedCorpus) else None
    loss_fn = loss_fn or causal_lm_loss
    adapter = adapters.adapter_of(opts)
    if adapter is not None and not adapters.is_adapted(model):
        model = adapters.attach(ctx, model, opts)
    # An adapter trains its own fp32 weights; the frozen ones stay as they came.
    upcast = to_master_weights(model, opts.precision) if adapter is None else None
    if adapter is None or adapter.method != "qlora":  # a 4-bit model is loaded on its device
        model.to(device)
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    plain = None
    if sharded:  # the module to hand back unsharded, then the sharding (before the optimizer sees the weights)
        plain = fsdp.shell(model)
        fsdp.shard(model, device)
    amp = autocast_dtype(opts.precision, device)
    scaler = (
        torch.amp.GradScaler(device.type)
        if amp == torch.float16 and device.type == "cuda"
        else None
    )
    optimizer = make_optimizer(model, opts)
    scheduler = LambdaLR(optimizer, Schedule(opts.schedule, opts.warmup_steps, opts.max_steps))
    root = checkpoint_dir if checkpoint_dir is not None else ctx.step_dir() / "checkpoints"
    state: dict[str, Any] = {"losses": [], "evals": [], "best": None, "bad": 0}
    step = resumed = 0
    found = ckpt.latest_checkpoint(root) if checkpoints and main else None
    if ddp and checkpoints:  # rank 0's choice; sent to ranks that cannot see it
        found = dist.broadcast_object(found)
        dist.ensure_folder(found, present=ckpt.verify)
    if found is not None:
        # Sharded: rank 0 reads the weights and optimizer state and sends each rank its shard.
        parts, meta = ckpt.load_checkpoint(found, skip=("model", "optimizer") if sharded and not main else ())
        if sharded:
            fsdp.load(model, optimizer, parts)
        elif adapter is not None:  # the adapter's weights; the frozen ones came with the step's input
            adapters.load_trainable(model, parts["model"])
        else:
            model.load_state_dict(parts["model"])
        if not sharded:
            optimizer.load_state_dict(parts["optimizer"])
        scheduler.load_state_dict(parts["scheduler"])
        if scaler is not None and "scaler" in parts:
            scaler.load_state_dict(parts["scaler"])
        ckpt.set_rng_state(parts["rng"])
        state = {k: meta[k] for k in state}
        state["losses"] = [tuple(x) for x in state["losses"]]
        step = resumed = int(meta["step"])
        print(f"resuming from {found} (step {step})", file=sys.stderr, flush=True)
    net = dist.wrap(model, device) if ddp and not sharded else model  # forward/backward; ``model`` for the rest
    agree = dist.agree_stop if ddp else _same
    reduce = dist.all_reduce_mean if ddp else None

    def save(t: float, gathered: dict[str, Any] | None = None) -> None:
        if emit:  # the console shows the write as it happens (a big model's takes a while)
            phases.start("checkpoint", index=ctx.index, kind=ctx.kind, step=step)
        if gathered is None:
            gathered = {
                "model": adapters.trainable_state(model) if adapter is not None else model.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
        parts = {
            **gathered,
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
        }
        if scaler is not None:
            parts["scaler"] = scaler.state_dict()
        folder = ckpt.save_checkpoint(root, step, parts, {**state, "max_steps": opts.max_steps})
        seconds = time.perf_counter() - t
        ctx.stop.observe(seconds, checkpoint=True)
        if emit:  # the manager sizes its stop margin and kill grace from these seconds
            ctx.emit("checkpoint", step=step, path=str(folder), seconds=round(seconds, 3))
            phases.end("checkpoint")

    def checkpoint() -> None:
        _flush(pending, state["losses"], step, reduce)
        t = time.perf_counter()
        # Sharded: every rank takes part in gathering the full state to rank 0, which writes it.
        gathered = ({"model": fsdp.model_state(model), "optimizer": fsdp.optimizer_state(model, optimizer)}
                    if sharded else None)
        if main:
            save(t, gathered)
        if ddp:  # no rank leaves (and has torchrun stop the others) before it is written
            dist.barrier()

    tokens_per_step = opts.batch_size * opts.grad_accum * corpus.seq_len
    pending: list[torch.Tensor] = []
    train_s = 0.0
    early = False
    stopped = agree(ctx.stop.reason()) if step < opts.max_steps else None
    while step < opts.max_steps and stopped is None and not early:
        t = time.perf_counter()
        torch.manual_seed(_dropout_seed(opts.seed, step, dist.rank() if ddp else 0))
        total = torch.zeros((), device=device)
        for micro in range(opts.grad_accum):
            batch = corpus.train_batch(opts.batch_size, step * opts.grad_accum + micro, opts.seed)
            labels = (masked.train_labels(opts.batch_size, step * opts.grad_accum + micro, opts.seed)
                      if masked is not None else None)
            if ddp:
                batch = dist.shard(batch)
                labels = dist.shard(labels) if labels is not None else None
            batch = batch.to(device, non_blocking=True)
            # DDP averages the gradients over the ranks on the last micro-batch only.
            last = micro == opts.grad_accum - 1
            # (FSDP reduce-scatters every micro-batch: the gradients stay sharded between them.)
            sync = net.no_sync() if ddp and not sharded and not last else contextlib.nullcontext()  # type: ignore[operator]
            with sync:
                with autocast(device, amp):
                    if labels is None:
                        loss = loss_fn(net, batch)
                    else:
                        loss = masked_lm_loss(net, batch, labels.to(device, non_blocking=True))
                scaled = loss / opts.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss.detach().float()
        if opts.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model)
        mark_step(device)
        step += 1
        pending.append(total / opts.grad_accum)
        if step % opts.log_every == 0 or step == opts.max_steps:
            window = _flush(pending, state["losses"], step, reduce)
            train_s += time.perf_counter() - t
            if emit:
                done = step - resumed
                ctx.emit(
                    "progress",
                    step=step,
                    max_steps=opts.max_steps,
                    loss=window,
                    lr=scheduler.get_last_lr()[0],
                    tokens=step * tokens_per_step,
                    tokens_per_s=done * tokens_per_step / max(train_s, 1e-9),
                )
        else:
            train_s += time.perf_counter() - t
        ctx.stop.observe(time.perf_counter() - t)
        if opts.eval_every is not None and (step % opts.eval_every == 0 or step == opts.max_steps):
            # Sharded, every rank runs the evaluation (a forward gathers weights from all of them).
            early = _periodic_eval(ctx, model, opts, amp, step, state, emit, report, ddp and not sharded)
        stopped = agree(ctx.stop.reason()) if step < opts.max_steps and not early else None
        if checkpoints and (
            stopped or (step % opts.checkpoint_every == 0 and step < opts.max_steps)
        ):
            checkpoint()
    _flush(pending, state["losses"], step, reduce)
    if plain is not None and (stopped is None or on_stop == "return"):
        optimizer.state.clear()  # its memory for the gathered weights
        model = fsdp.unshard(model, plain)  # every rank, as DDP leaves it: the whole trained model
    result = TrainResult(
        model=model,
        steps_done=step,
        losses=state["losses"],
        tokens_per_s=(step - resumed) * tokens_per_step / train_s if train_s > 0 else 0.0,
        wall_s=time.perf_counter() - started,
        stopped=stopped,
        early_stopped=early,
        best_eval_loss=state["best"],
        evals=[tuple(e) for e in state["evals"]],
        resumed_from=resumed or None,
        upcast=upcast,
        weights_dtype=trained_dtype(model),
        strategy="fsdp" if sharded else "ddp" if ddp else "single",
    )
    if stopped is not None and on_stop == "raise":
        raise StopRequested(stopped, step)
    return result


def _same(reason: str | None) -> str | None:
    return reason


def _dropout_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of optimizer step ``step`` (dropout): a function of (seed, step,
    rank) so a resumed run draws the same masks, and ranks draw different ones."""
    return (seed * 1_000_003 + step + rank * 0x9E3779B97F4A7C15) % (2**63 - 1)


def _flush(
    pending: list[torch.Tensor],
    losses: list[tuple[int, float]],
    step: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float | None:
    """Move pending per-step losses (device tensors) into ``losses``: one sync.
    ``reduce`` (distributed: the mean over the ranks) is applied to them first; every
    rank calls this at the same steps."""
    if not pending:
        return None
    stacked = torch.stack(pending)
    values = (reduce(stacked) if reduce is not None else stacked).tolist()
    first = step - len(values) + 1
    losses.extend((first + i, float(v)) for i, v in enumerate(values))
    pending.clear()
    window = sum(values) / len(values)
    if not math.isfinite(window):
        raise StepError(
            f"the training loss is {window} at step {step}: training diverged "
            "(lower lr, set grad_clip, or use fp32)"
        )
    return window


def _periodic_eval(
    ctx: StepContext,
    model: nn.Module,
    opts: TrainOptions,
    amp: torch.dtype | None,
    step: int,
    state: dict[str, Any],
    emit: bool,
    report: Callable[[int, float], None] | None,
    ddp: bool = False,
) -> bool:
    """Evaluate, record, report; True when early stopping says stop. Distributed: rank 0
    evaluates (the weights are the same everywhere) and sends the result to the others,
    so every rank takes the same early-stopping decision."""

    def measure() -> tuple[float, float]:
        return corpus_eval_loss(model, ctx.corpus, opts.batch_size, opts.eval_batches, ctx.device, dtype=amp)

    loss, acc = dist.on_main(measure) if ddp else measure()
    model.train()
    state["evals"].append((step, loss))
    if emit:
        ctx.emit(
            "metrics",
            step=step,
            metrics={"eval_loss": loss, "perplexity": perplexity(loss), "accuracy": acc},
        )
    if report is not None:
        report(step, loss)
    es = opts.early_stopping
    if state["best"] is None or loss < state["best"] - (es.min_delta if es else 0.0):
        state["best"], state["bad"] = loss, 0
    else:
        state["bad"] += 1
    return es is not None and state["bad"] >= es.patience


def downsample(points: list[tuple[int, float]], n: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """At most ``n`` points: means of consecutive buckets."""
    if len(points) <= n:
        return list(points)
    size = math.ceil(len(points) / n)
    out = []
    for i in range(0, len(points), size):
        bucket = points[i : i + size]
        out.append((bucket[-1][0], sum(v for _, v in bucket) / len(bucket)))
    return out


def preflight(step: TrainOptions, device: torch.device) -> None:
    """Under torchrun, the global ``batch_size`` must split evenly among the processes; an adapter
    needs peft (and QLoRA a CUDA GPU with bitsandbytes)."""
    dist.split_batch(step.batch_size)
    adapter = adapters.adapter_of(step)
    if adapter is not None:
        adapters.preflight(adapter, device)


def run(ctx: StepContext, step: TrainStep, model: nn.Module) -> StepOutcome:
    params = sum(p.numel() for p in model.parameters())
    res = train_loop(ctx, model, step, distributed=True)
    sizes: dict[str, Any] = {"trainable_params": params, "params": params}
    saved: dict[str, Any] = {}
    if step.adapter is not None:  # the adapter beside the model; the model merged
        main = dist.world() <= 1 or dist.is_main()
        res.model, sizes, saved = adapters.finish(ctx, res.model, step.adapter, save=main)
    tail = [v for _, v in res.losses[-step.log_every :]]
    metrics: dict[str, Any] = {
        **sizes,
        "train_loss": sum(tail) / len(tail) if tail else None,
        "steps": res.steps_done,
        "tokens": res.steps_done * step.batch_size * step.grad_accum * ctx.corpus.seq_len,
        "tokens_per_s": res.tokens_per_s,
        "early_stopped": res.early_stopped,
    }
    if res.best_eval_loss is not None:
        metrics["best_eval_loss"] = res.best_eval_loss
    if res.upcast is not None:
        metrics["upcast"] = res.upcast
    if res.weights_dtype is not None:
        metrics["weights_dtype"] = res.weights_dtype
    metrics["strategy"] = res.strategy
    extra = {"loss_curve": downsample(res.losses), "eval_curve": res.evals, **saved}
    return StepOutcome(model=res.model, metrics=metrics, extra=extra)
