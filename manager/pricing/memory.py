"""Peak memory of each step of a spec, per GPU, and which offers' GPUs can hold it.

One process per GPU (torchrun under several GPUs or nodes: train and distill split ``batch_size``
among them, DDP keeps a full copy of everything on each). What one process holds at its peak:

- **weights**: full training keeps fp32 master weights (the workload upcasts a bf16 checkpoint);
  LoRA keeps the frozen ones as they came (fp32 under ``precision: fp32``) plus fp32 adapters; QLoRA
  holds the Linear weights in 4-bit NF4 with double quantization (0.516 bytes each) and the rest in
  fp32 (``prepare_model_for_kbit_training``). Evaluation holds the model in the dtype it runs in: a
  model built from ``model.init`` or trained in full is fp32, a hub/path checkpoint its own dtype
  on a GPU (``config.json``'s, bf16 for a hub id), a quantized one its packed width.
- **gradients and optimizer states** of what trains (fp32): AdamW 2 states, SGD/RMSprop one per
  momentum/average; DDP adds its gradient buckets. ``sharded`` (FSDP, ``train.strategy: fsdp``:
  master weights, gradients and states split among the processes, one block's weights gathered at a
  time; as the step starts and ends each process holds the whole model too) is what a train step
  gets where the plan picks fsdp (``step_strategies``): where it does not fit one GPU unsharded.
- **activations** kept for the backward pass, per layer per token: ``32h + 2kv·a + 4i·a`` bytes at
  fp32 (a = 4) and ``30h + 2kv·a + 4i·a`` under bf16/fp16 autocast (a = 2; the norms keep fp32
  copies), ``h`` the width, ``kv`` the key/value width, ``i`` the MLP width. Under an adapter the
  frozen Linears and norms keep less (no input for a weight gradient), an adapter with dropout keeps
  its dropped-out input and mask (5.6 bytes an element at fp32, 3.8 under autocast) and its rank-r
  output. Autocast keeps a bf16 copy of every fp32 Linear
  weight for the backward pass. Gradient checkpointing keeps only each layer's input (fp32 ``h``)
  and recomputes one layer at a time.
- **logits**: the ``[batch, seq, vocab]`` tensor and what cross-entropy makes of it, 12 bytes an
  element as the backward pass starts (the saved log-softmax, its gradient, the logits' gradient);
  distillation 32 (teacher and student, two log-softmaxes and the KL term). An evaluation's
  cross-entropy holds 8 bytes an element, and generation its KV cache.
- the **CUDA context** (:data:`CUDA_CONTEXT_GIB`) on a GPU.

The peak of a training step is the larger of two moments: the start of the backward pass (every
saved activation and the logits alive, gradients only under ``grad_accum`` > 1) and its end (every
gradient, one layer's activations). The coefficients were measured on this machine's CPU (every
tensor storage a step allocates, counted through a dispatch mode) on Llama-style models; the tests
hold the estimate within 15% of that measurement (``tests/manager/pricing/test_memory.py``). A GPU
fits a step when the estimate is at most :data:`HEADROOM` of its memory (allocator fragmentation).

Units: bytes inside, GiB (2**30 bytes) in what people read (``memory_gb`` in ``plan --json``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optjob.specs.steps import (
    AdapterSpec,
    DistillStep,
    EvaluateStep,
    HpoStep,
    PruneStep,
    QuantizeStep,
    TrainOptions,
    TrainStep,
)

from .accelerators import GPU_MEMORY_GIB, gpu_memory_gib, tpu_chips
from .model_shape import Shape, model_shape

if TYPE_CHECKING:
    from optjob.specs.job import JobSpec

    from .offers import Offer

GIB = 2**30
#: What CUDA, cuBLAS and the caching allocator take on a GPU before the first tensor.
CUDA_CONTEXT_GIB = 0.5
#: A step fits a GPU when its estimate is at most this share of the GPU's memory.
HEADROOM = 0.95
#: Bytes per Linear weight held by QLoRA: NF4 (4 bits) + an fp8 absmax per 64 weights + an fp32
#: scale per 256 absmax values (bitsandbytes' double quantization).
QLORA_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
#: Activation bytes per layer per token and unit of width, at fp32 and under autocast (see the module doc).
ACT_PER_HIDDEN = {4: 32.0, 2: 30.0}
ACT_KV_ELEMENTS = 2.0
#: Elements per unit of MLP width kept per layer per token: gate, up, activation, product (a gpt2
#: MLP's tanh-GELU keeps more intermediate tensors).
ACT_MLP_ELEMENTS = {"gpt2": 7.0}
ACT_MLP_DEFAULT = 4.0
#: Bytes per logit element: training at fp32 / under autocast, distillation, evaluation.
LOGIT_BYTES = {4: 12.0, 2: 12.0}
DISTILL_LOGIT_BYTES = 32.0
EVAL_LOGIT_BYTES = 8.0
#: Tokens of the prompt the latency measurement generates from (``steps.evaluate.PROMPT_TOKENS``).
PROMPT_TOKENS = 16
# -- one step ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMemory:
    """What one process holds at a step's peak, by part (bytes)."""

    index: int | None
    what: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GIB)
        return f"{self.what} needs {self.gib:.1f} GiB per GPU ({shown})"


def _act_bytes(shape: Shape, a: int) -> float:
    """Activation bytes one layer keeps per token for the backward pass."""
    mlp = ACT_MLP_ELEMENTS.get(shape.family, ACT_MLP_DEFAULT)
    return ACT_PER_HIDDEN[a] * shape.hidden + a * (ACT_KV_ELEMENTS * shape.kv_dim + mlp * shape.intermediate)


#: Bytes per element of a LoRA target's dropped-out input (and its mask) kept for the backward pass.
LORA_DROPOUT_BYTES = {4: 5.6, 2: 3.83}
#: Bytes per unit of width a frozen block no longer keeps: the norms' inputs, kept for their weights' gradients.
FROZEN_NORM_SAVING = {4: 8.0, 2: 5.4}
_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj", "c_attn"), "gate_up": ("gate_proj", "up_proj", "c_fc"),
           "down": ("down_proj", "mlp.c_proj"), "o": ("o_proj", "attn.c_proj")}


def _targeted(adapter: AdapterSpec, group: str) -> bool:
    if adapter.targets == "all-linear":
        return True
    names = _GROUPS[group]
    return any(t == name or name.endswith("." + t) or t.endswith(name) for t in adapter.targets for name in names)


def _adapter_act_bytes(shape: Shape, adapter: AdapterSpec, a: int) -> float:
    """Activation bytes one layer keeps per token when only an adapter trains: a frozen Linear keeps
    no input of its own (an adapter without dropout keeps it; with dropout, its dropped-out copy and
    mask instead), and the norms keep no input for their frozen weights."""
    h, i = shape.hidden, shape.intermediate
    out = _act_bytes(shape, a) - FROZEN_NORM_SAVING[a] * h
    if not _targeted(adapter, "gate_up"):
        out -= 4.0 * h  # the MLP's normalised input (fp32, the norm's output)
    if not _targeted(adapter, "down"):
        out -= a * i  # the MLP product, down_proj's input
    if adapter.dropout > 0:
        widths = {"qkv": 3 * h, "o": h, "gate_up": 2 * h, "down": i}
        dropped = sum(w for g, w in widths.items() if _targeted(adapter, g))
        if adapter.targets != "all-linear":  # a single projection of a group, not the whole group
            dropped = sum(h if t not in ("down_proj", "mlp.c_proj") else i for t in adapter.targets)
        out += dropped * LORA_DROPOUT_BYTES[a]
    return out + shape.lora_targets(adapter) * adapter.r * a


def optimizer_bytes(opts: TrainOptions, trainable: float) -> float:
    """fp32 optimizer state: AdamW's two moments, SGD's momentum, RMSprop's average (and momentum)."""
    if opts.optimizer == "adamw":
        per = 8
    elif opts.optimizer == "sgd":
        per = 4 if opts.momentum > 0 else 0
    else:
        per = 4 + (4 if opts.momentum > 0 else 0)
    return per * trainable


def train_memory(shape: Shape, opts: TrainOptions, seq_len: int, *, weight_bytes: float | None = None,
                 world: int = 1, sharded: bool = False, gpu: bool = True,
                 logit_bytes: float | None = None, what: str = "train", index: int | None = None) -> StepMemory:
    """Peak bytes per process of an optimizer loop over ``shape`` (``opts``: a train or distill
    step's options). ``weight_bytes``: bytes per weight of the model it starts from (default: the
    checkpoint's); ``world``: processes sharing the batch."""
    adapter = opts.adapter if isinstance(opts, TrainStep) else None
    half = opts.precision != "fp32"
    a = 2 if half else 4
    base_bytes = shape.dtype_bytes if weight_bytes is None else weight_bytes
    world = max(1, world)
    tokens = math.ceil(opts.batch_size / world) * seq_len
    n = shape.params
    linear = shape.linear_params
    head = shape.vocab * shape.hidden
    if adapter is None:
        trainable = float(n)
        weights = 4.0 * n  # fp32 master weights
        copies = 2.0 * (linear + head) if half else 0.0  # autocast's bf16 copies, kept for backward
    else:
        trainable = float(shape.lora_params(adapter))
        if adapter.method == "qlora":
            weights = QLORA_BYTES * linear + 4.0 * (n - linear)
            copies = 2.0 * shape.layer_linear()  # one block dequantized at a time
        else:
            frozen = 4.0 if opts.precision == "fp32" else base_bytes
            weights = frozen * n
            copies = 2.0 * (linear + head) if half and frozen == 4 else 0.0
        weights += 4.0 * trainable
    grads = 4.0 * trainable
    states = optimizer_bytes(opts, trainable)
    buckets = 4.0 * trainable if world > 1 and not sharded else 0.0  # DDP's gradient buckets
    unsharded = 0.0
    if sharded and world > 1:
        gathered = 4.0 * n / shape.layers if adapter is None else 0.0  # one block gathered at a time
        if adapter is None:
            unsharded = weights  # the whole model, gathered on every process as the step ends
            weights = weights / world + gathered
        grads, states = grads / world, states / world
    layer = tokens * (_adapter_act_bytes(shape, adapter, a) if adapter else _act_bytes(shape, a))
    saved = shape.layers * tokens * shape.hidden * 4.0 if opts.gradient_checkpointing else shape.layers * layer
    logits = tokens * shape.vocab * (logit_bytes if logit_bytes is not None else LOGIT_BYTES[a])
    head_grad = 4.0 * head if adapter is None else 0.0
    misc = tokens * shape.hidden * 4.0  # the final norm's input, the hidden states' gradient
    accumulated = grads if opts.grad_accum > 1 else 0.0
    start = saved + copies + logits + misc + max(head_grad, accumulated)  # backward begins
    end = grads + layer + misc + (tokens * shape.hidden * 4.0 if opts.gradient_checkpointing else 0.0)
    parts = {"weights": weights, "optimizer": states}
    if start >= end:
        parts.update(gradients=max(head_grad, accumulated) + buckets, activations=saved + copies + misc,
                     logits=logits)
    else:
        parts.update(gradients=grads + buckets, activations=end - grads)
    if unsharded and unsharded + weights > sum(parts.values()):  # the optimizer state is freed by then
        parts = {"weights": unsharded + weights}
    if gpu:
        parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return StepMemory(index, what, parts)


def eval_memory(shape: Shape, step: EvaluateStep, seq_len: int, weight_bytes: float, *, gpu: bool = True,
                what: str = "evaluate", index: int | None = None) -> StepMemory:
    """Peak bytes of an evaluation: the model, the eval batch's logits and cross-entropy (or one
    block's transients, when larger), generation's KV cache."""
    a = 4 if weight_bytes >= 4 else 2
    tokens = step.batch_size * seq_len
    work = 0.0
    if {"perplexity", "accuracy"} & set(step.metrics):
        logits = tokens * shape.vocab * EVAL_LOGIT_BYTES
        block = tokens * (shape.hidden * 4.0 + 3 * shape.intermediate * a)
        work = max(logits, block)
    cache = 0.0
    if "latency" in step.metrics:
        cache = 2.0 * shape.layers * shape.kv_dim * (PROMPT_TOKENS + step.generate_tokens) * a
        work = max(work, seq_len * shape.vocab * EVAL_LOGIT_BYTES)  # a one-sequence forward
    parts = {"weights": weight_bytes * shape.params, "activations": work, "kv_cache": cache}
    if gpu:
        parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return StepMemory(index, what, parts)


# -- the pipeline ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Every step's peak per process (automatic evaluations included), and notes on guesses."""

    steps: list[StepMemory]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StepMemory:
        return max(self.steps, key=lambda s: s.total)


#: What the runner evaluates before the first step and after each other one (its default).
AUTO_EVALUATE = EvaluateStep()


def estimate_memory(spec: JobSpec, *, world: int = 1, gpu: bool = True, sharded: bool = False,
                    shard: frozenset[int] = frozenset()) -> MemoryPlan:
    """The peak per process of every step of ``spec`` run by ``world`` processes (one per GPU);
    ``sharded``: every train and distill step sharded, ``shard``: the train steps of these indices."""
    shape, note = model_shape(spec.model)
    notes = [note] if note else []
    seq = spec.data.seq_len
    # A hub model loads in fp32 on a CPU, a folder in its own dtype, a built one in fp32.
    wbytes = shape.dtype_bytes if gpu or spec.model.path is not None else 4.0
    out = [eval_memory(shape, AUTO_EVALUATE, seq, wbytes, gpu=gpu, what="the baseline evaluation")]
    pipeline = spec.pipeline
    for i, step in enumerate(pipeline):
        name = f"steps[{i}] {step.kind}"
        if isinstance(step, TrainStep):
            out.append(train_memory(shape, step, seq, weight_bytes=wbytes, world=world, sharded=sharded or i in shard,
                                    gpu=gpu, what=name, index=i))
            adapter = step.adapter
            if adapter is None or (adapter.method == "lora" and step.precision == "fp32"):
                wbytes = 4.0
        elif isinstance(step, DistillStep):
            student = _student(shape, step)
            mem = train_memory(student, step, seq, world=world, sharded=sharded, gpu=gpu,
                               logit_bytes=DISTILL_LOGIT_BYTES, what=name, index=i)
            teacher = wbytes * shape.params
            rows = math.ceil(step.batch_size / max(1, world))
            forward = rows * seq * (shape.hidden * 4.0 + 3 * shape.intermediate * 2)  # no-grad, one block at a time
            out.append(replace(mem, parts={"teacher": teacher + forward, **mem.parts}))
            shape, wbytes = student, 4.0
        elif isinstance(step, HpoStep):
            out.append(_hpo_memory(spec, i, step, shape, seq, wbytes, gpu, name))
        elif isinstance(step, PruneStep):
            out.append(_prune_memory(shape, step, seq, wbytes, gpu, name, i))
            shape = _pruned(shape, step)
            if step.recover_steps:
                wbytes = 4.0
        elif isinstance(step, QuantizeStep):
            out.append(_quantize_memory(shape, step, seq, wbytes, gpu, name, i))
            wbytes = _quantized_bytes(shape, step, wbytes)
        elif isinstance(step, EvaluateStep):
            out.append(eval_memory(shape, step, seq, wbytes, gpu=gpu, what=name, index=i))
        if not isinstance(step, (EvaluateStep, HpoStep)):
            out.append(eval_memory(shape, AUTO_EVALUATE, seq, wbytes, gpu=gpu, index=i,
                                   what=f"the evaluation after steps[{i}] {step.kind}"))
    for variant in spec.variants:  # each compare variant from the model before compare, sized on its own
        own = estimate_memory(spec.variant_spec(variant), world=world, gpu=gpu, sharded=sharded, shard=shard)
        for mem in own.steps:
            if mem.index is not None and mem.index >= len(pipeline):
                j = mem.index - len(pipeline)
                where = mem.what.replace(f"steps[{mem.index}]", f"compare {variant} step {j}")
                out.append(replace(mem, index=len(pipeline), what=where))
    return MemoryPlan(out, notes)


def _student(teacher: Shape, step: DistillStep) -> Shape:
    s = step.student
    return replace(teacher, layers=s.layers or teacher.layers, hidden=s.hidden or teacher.hidden,
                   heads=s.heads or teacher.heads,
                   kv_heads=min(teacher.kv_heads, s.heads or teacher.heads),
                   intermediate=s.intermediate or teacher.intermediate, dtype_bytes=4.0)


def _pruned(shape: Shape, step: PruneStep) -> Shape:
    if step.method != "structured":
        return shape
    heads = max(1, shape.heads - round(shape.heads * step.heads_fraction))
    return replace(shape, heads=heads, kv_heads=max(1, min(shape.kv_heads, heads)),
                   intermediate=shape.intermediate - round(shape.intermediate * step.mlp_fraction))


def _calibration_bytes(shape: Shape, samples: int, seq: int, hessian: bool) -> float:
    """A layer-by-layer calibration pass: every window's input and output of the current block,
    and (SparseGPT, GPTQ) the widest Linear's Hessian and its inverse."""
    acts = 2.0 * samples * seq * shape.hidden * 4
    widest = max(shape.hidden, shape.intermediate)
    return acts + (2.0 * widest * widest * 4 if hessian else 0.0) + 4.0 * shape.layer_linear()


def _prune_memory(shape: Shape, step: PruneStep, seq: int, wbytes: float, gpu: bool, what: str,
                  index: int) -> StepMemory:
    if step.method in ("wanda", "sparsegpt"):
        work = _calibration_bytes(shape, step.calibration.samples, step.calibration.seq_len or seq,
                                  step.method == "sparsegpt")
    else:  # the global threshold ranks every Linear weight at once (magnitudes and a selection buffer)
        work = 2.0 * 4 * shape.linear_params
    one_shot = StepMemory(index, what, {"weights": wbytes * shape.params, "activations": work,
                                        **({"cuda_context": CUDA_CONTEXT_GIB * GIB} if gpu else {})})
    if not step.recover_steps:
        return one_shot
    opts = TrainOptions(batch_size=step.batch_size, lr=step.lr)
    recover = train_memory(_pruned(shape, step), opts, seq, weight_bytes=wbytes, gpu=gpu, what=what, index=index)
    return max(one_shot, recover, key=lambda m: m.total)


def _quantized_bytes(shape: Shape, step: QuantizeStep, wbytes: float) -> float:
    """Bytes per weight after ``step`` (packed Linear weights and their group scales, the rest as was)."""
    if step.method in ("fp16", "bf16"):
        return 2.0
    if step.method in ("int8-dynamic", "int8-weight"):
        bits = 8.0
    elif step.method == "int4-weight":
        bits = 4.0 + 32.0 / step.group_size
    else:
        bits = step.bits + 32.0 / step.group_size
    rest = shape.params - shape.linear_params
    return (bits / 8 * shape.linear_params + wbytes * rest) / shape.params


def _quantize_memory(shape: Shape, step: QuantizeStep, seq: int, wbytes: float, gpu: bool, what: str,
                     index: int) -> StepMemory:
    work = (_calibration_bytes(shape, step.calibration.samples, step.calibration.seq_len or seq, True)
            if step.method == "gptq" else 4.0 * shape.layer_linear())
    parts = {"weights": wbytes * shape.params + _quantized_bytes(shape, step, wbytes) * shape.params,
             "activations": work}
    if gpu:
        parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return StepMemory(index, what, parts)


def _hpo_memory(spec: JobSpec, i: int, step: HpoStep, shape: Shape, seq: int, wbytes: float, gpu: bool,
                what: str) -> StepMemory:
    """A trial trains a copy of the step's input (or a fresh model of a searched architecture) on
    one process while the input is kept: priced at the largest values the space can draw."""
    tuned = next((s for s in spec.pipeline[i + 1:] if isinstance(s, (TrainStep, DistillStep))), None)
    if tuned is None:
        return StepMemory(i, what, {"weights": wbytes * shape.params})
    arch: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    for key, dist in step.space.items():
        top = _largest(dist)
        if top is None:
            continue
        parts = key.split(".")
        if parts[:2] == ["model", "init"] and parts[2] in ("layers", "hidden", "heads", "intermediate"):
            arch[parts[2]] = top
        elif parts[0] == tuned.kind and len(parts) == 2 and parts[1] in ("batch_size", "grad_accum"):
            opts[parts[1]] = top
        elif parts[:2] == ["train", "adapter"] and parts[2] == "r" and isinstance(tuned, TrainStep) and tuned.adapter:
            opts["adapter"] = tuned.adapter.model_copy(update={"r": top})
    trial_shape = replace(shape, **arch)
    if "heads" in arch:
        trial_shape = replace(trial_shape, kv_heads=min(trial_shape.kv_heads, arch["heads"]))
    options = tuned.model_copy(update=opts)
    if isinstance(options, DistillStep):
        mem = train_memory(_student(trial_shape, options), options, seq, gpu=gpu, logit_bytes=DISTILL_LOGIT_BYTES,
                           what=what, index=i)
    else:
        mem = train_memory(trial_shape, options, seq, weight_bytes=wbytes, gpu=gpu, what=what, index=i)
    return replace(mem, parts={"search input": wbytes * shape.params, **mem.parts})


def _largest(dist: Any) -> int | None:
    values = dist.choice if dist.choice is not None else (dist.int if dist.int is not None else None)
    numbers = [v for v in values or [] if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return int(max(numbers)) if numbers else None


# -- the offers ----------------------------------------------------------------------------------------


def needs_cuda(spec: JobSpec) -> int | None:
    """The index of the first step that needs a CUDA GPU (a QLoRA train step, in a compare variant too:
    then the compare step's index), if any."""
    variant_steps = [(len(spec.pipeline), s) for steps in spec.variants.values() for s in steps]
    return next((i for i, s in [*enumerate(spec.pipeline), *variant_steps]
                 if isinstance(s, TrainStep) and s.adapter is not None and s.adapter.method == "qlora"), None)


def local_has_cuda() -> bool:
    """Whether this machine has an NVIDIA driver and a visible GPU (no torch import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists()


def can_shard(step: object) -> bool:
    """Whether the workload can train ``step`` with FSDP (a train step without an adapter or fp16)."""
    return isinstance(step, TrainStep) and step.adapter is None and step.precision != "fp16"


def step_strategies(spec: JobSpec, world: int, capacity_gib: float | None, *,
                    gpu: bool = True) -> tuple[dict[int, str], MemoryPlan]:
    """How each train and distill step runs on ``world`` processes with GPUs of ``capacity_gib``, and
    the memory that takes: "single" (one process); the step's own ``strategy``; else "fsdp" where the
    step does not fit a GPU unsharded (and the workload can shard it), "ddp" otherwise."""
    trains = {i: s for i, s in enumerate(spec.pipeline) if isinstance(s, TrainOptions)}
    if world <= 1:
        return dict.fromkeys(trains, "single"), estimate_memory(spec, world=1, gpu=gpu)
    chosen = frozenset(i for i, s in trains.items() if s.strategy == "fsdp")
    plan = estimate_memory(spec, world=world, gpu=gpu, shard=chosen)
    if capacity_gib is not None:
        names = {f"steps[{i}] {s.kind}": i for i, s in trains.items()}
        over = {names[m.what] for m in plan.steps if m.what in names and m.gib > HEADROOM * capacity_gib}
        auto = frozenset(i for i in over if trains[i].strategy is None and can_shard(trains[i]))
        if auto:
            chosen |= auto
            plan = estimate_memory(spec, world=world, gpu=gpu, shard=chosen)
    return {i: "fsdp" if i in chosen else "ddp" for i in trains}, plan


def offer_strategies(spec: JobSpec, accelerators: str | None, *, local: bool = False) -> dict[int, str]:
    """``step_strategies`` on ``resources.nodes`` nodes of ``accelerators`` ("A100:8", None: CPU), as
    ``fit_offers`` decides them for an offer of that kind."""
    from .calibration import split_accelerator

    name, count = split_accelerator(accelerators)
    gpu = name is not None and tpu_chips(name) is None
    nodes = 1 if local else spec.resources.nodes
    world = 1 if local else nodes * count if gpu else nodes
    return step_strategies(spec, world, gpu_memory_gib(name) if gpu else None, gpu=gpu)[0]


@dataclass
class Fit:
    """Which offers can hold the job: the kept ones, each offer's need and GPU memory (GiB), notes,
    and the reason when none can."""

    kept: list[Offer]
    need_gib: dict[int, float]
    gpu_gib: dict[int, float | None]
    notes: list[str]
    reason: str | None = None

    def of(self, offer: Offer) -> tuple[float | None, float | None]:
        return self.need_gib.get(id(offer)), self.gpu_gib.get(id(offer))


def fit_offers(spec: JobSpec, offers: list[Offer], *, local: bool = False) -> Fit:
    """Drop the offers whose GPUs cannot hold the job's largest step (one note per accelerator
    size, saying what it needs), and those without a CUDA GPU for a QLoRA step. A train step that
    fits an offer's GPUs only sharded counts as sharded there (``step_strategies``)."""
    cuda_step = needs_cuda(spec)
    nodes = 1 if local else spec.resources.nodes
    plans: dict[tuple[int, bool, float | None], tuple[dict[int, str], MemoryPlan]] = {}
    fit = Fit([], {}, {}, [])
    dropped: dict[tuple[str, float], tuple[int, StepMemory]] = {}
    no_cuda: list[Offer] = []
    for offer in offers:
        name = offer.accelerator_name
        gpu = name is not None and tpu_chips(name) is None
        if cuda_step is not None and not gpu and not (offer.cloud == "local" and name is None and local_has_cuda()):
            no_cuda.append(offer)
            continue
        world = nodes * max(1, offer.accelerator_count) if gpu else nodes
        if local or offer.cloud == "local":  # the local provider runs one process
            world = 1
        capacity = gpu_memory_gib(name) if gpu else None
        key = (world, gpu, capacity)
        if key not in plans:
            plans[key] = step_strategies(spec, world, capacity, gpu=gpu)
        peak = plans[key][1].peak
        fit.need_gib[id(offer)] = round(peak.gib, 3)
        fit.gpu_gib[id(offer)] = capacity
        if capacity is not None and peak.gib > HEADROOM * capacity:
            label = f"{name}:{offer.accelerator_count}"
            count, _ = dropped.get((label, capacity), (0, peak))
            dropped[(label, capacity)] = (count + 1, peak)
            continue
        fit.kept.append(offer)
    for _, plan in plans.values():
        fit.notes.extend(n for n in plan.notes if n not in fit.notes)
    for (label, capacity), (count, peak) in sorted(dropped.items()):
        fit.notes.append(f"dropped {count} offer(s) with {label} ({capacity:g} GiB per GPU): {peak.describe()}")
    if no_cuda:
        fit.notes.append(f"dropped {len(no_cuda)} offer(s) without a CUDA GPU: steps[{cuda_step}] train "
                         "uses adapter method qlora (bitsandbytes 4-bit)")
    if not fit.kept and offers:
        fit.reason = _why_none(spec, cuda_step, dropped, no_cuda, local)
    return fit


def holders(need_gib: float) -> list[str]:
    """The GPUs (from the memory table) that hold ``need_gib`` per GPU, smallest first."""
    fits = sorted((cap, name) for name, cap in GPU_MEMORY_GIB.items() if need_gib <= HEADROOM * cap)
    return [name for _, name in fits]


def _why_none(spec: JobSpec, cuda_step: int | None, dropped: dict[tuple[str, float], tuple[int, StepMemory]],
              no_cuda: list[Offer], local: bool) -> str:
    if not dropped and no_cuda:
        where = "this run has none" if local or spec.resources.cloud == "local" else "no offer has one"
        return (f"steps[{cuda_step}] train: adapter method qlora needs a CUDA GPU (bitsandbytes 4-bit) and {where}; "
                "use adapter.method: lora, or give resources.accelerators")
    peak = max((p for _, p in dropped.values()), key=lambda p: p.total)
    gpus = holders(peak.gib)
    hold = (f"GPUs that hold it: {', '.join(gpus)}" if gpus else
            "no single GPU holds it: use gradient_checkpointing, a smaller batch_size, or an adapter (lora/qlora)")
    return f"no offer's GPU has the memory: {peak.describe()}; {hold}"
