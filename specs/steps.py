"""``steps:`` — the pipeline. Each item is a mapping with exactly one key, the step kind.

In YAML a step is ``- train: {max_steps: 300}``; in Python it is the inner model
(``TrainStep``), reached through ``JobSpec.pipeline``. Every step kind has a
``kind`` class attribute; ``STEP_TYPES`` maps kinds to classes.
"""

from __future__ import annotations

import builtins
import difflib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Discriminator, Field, RootModel, Tag, model_validator
from pydantic_core import PydanticCustomError

from .base import MAX_BATCH, MAX_STEPS, Seed, StrictModel

#: fp32; bf16/fp16: fp32 master weights, matmuls under autocast; checkpoint: the weights stay in the
#: dtype the model came in (a bf16 checkpoint trains in pure bf16), no autocast.
Precision = Literal["fp32", "bf16", "fp16", "checkpoint"]


class EarlyStopping(StrictModel):
    patience: int = Field(3, ge=1, le=1_000_000)
    """Evaluations without improvement before stopping."""
    min_delta: float = Field(0.0, ge=0.0)
    """Smallest eval-loss decrease that counts as an improvement."""


class StepBase(StrictModel):
    kind: ClassVar[str] = ""
    #: True for steps that run an optimizer (they checkpoint and resume mid-step).
    trains: ClassVar[bool] = False


class TrainOptions(StepBase):
    """Options shared by every step that runs an optimizer loop."""

    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    """Optimizer steps."""
    lr: float = Field(3e-4, gt=0.0, le=10.0)
    """Peak learning rate."""
    optimizer: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    """Optimizer."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Momentum for sgd and rmsprop."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """Decoupled weight decay."""
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    """Sequences per micro-batch in all (the global batch: split evenly across processes under torchrun)."""
    grad_accum: int = Field(1, ge=1, le=4096)
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the gradient norm to this value (null: no clipping)."""
    precision: Precision = "fp32"
    """fp32; bf16/fp16: autocast over fp32 master weights (whatever the checkpoint's dtype); checkpoint:
    train in the checkpoint's own dtype, no upcast (pure bf16 rounds away updates below ~1/256 of a weight)."""
    seed: Seed = 0
    """Seed for init, data order and dropout: same seed, same result."""
    eval_every: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Evaluate on the eval split every N steps (and at the end)."""
    eval_batches: int = Field(8, ge=1, le=1_000_000)
    """Batches per periodic evaluation."""
    checkpoint_every: int = Field(50, ge=1, le=MAX_STEPS)
    """Write a resumable checkpoint every N steps."""
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    """Emit a progress event every N steps."""
    early_stopping: EarlyStopping | None = None
    """Stop when eval loss stops improving (needs eval_every)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: far less
    memory for about a third more compute."""
    strategy: Literal["ddp", "fsdp"] | None = None
    """How several processes (GPUs) train: ddp (each holds the whole model and optimizer state) or
    fsdp (weights, gradients and optimizer state sharded among them); null: the plan picks fsdp where
    the step does not fit one GPU unsharded but fits sharded, ddp otherwise."""

    @model_validator(mode="after")
    def _checks(self) -> TrainOptions:
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs eval_every")
        if self.strategy == "fsdp":
            if self.kind == "distill":
                raise ValueError("strategy fsdp is not supported by distill (the teacher is not sharded): use ddp")
            if getattr(self, "adapter", None) is not None:
                raise ValueError("strategy fsdp is not supported with an adapter (lora/qlora): use ddp; the frozen "
                                 "base is not sharded, only the adapter trains")
            if self.precision == "fp16":
                raise ValueError("strategy fsdp does not support precision fp16 (its loss scaler is per process): "
                                 "use bf16")
        return self

    def tokens(self, seq_len: int) -> int:
        return self.max_steps * self.batch_size * self.grad_accum * seq_len


#: The ``adapter`` fields an hpo search may vary (``train.adapter.r``, ...).
ADAPTER_SEARCH_FIELDS = ("r", "alpha", "dropout")
_MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$"


class AdapterSpec(StrictModel):
    """Parameter-efficient fine-tuning (peft): low-rank adapters on a frozen model."""

    method: Literal["lora", "qlora"] = "lora"
    """lora: adapters on the frozen model as it is; qlora: the frozen model held in 4-bit NF4
    (bitsandbytes, CUDA GPUs only)."""
    r: int = Field(16, ge=1, le=4096)
    """Rank of each adapter."""
    alpha: float = Field(32.0, gt=0.0, le=1_000_000.0)
    """Scaling numerator: an adapter's update is multiplied by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on each adapter's input."""
    targets: Literal["all-linear"] | list[Annotated[str, Field(pattern=_MODULE_NAME)]] = "all-linear"
    """Which Linear layers get adapters: all-linear (every one but the output head) or module
    names, e.g. [q_proj, v_proj]."""

    @model_validator(mode="after")
    def _checks(self) -> AdapterSpec:
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets: give at least one module name, or all-linear")
        return self


class TrainStep(TrainOptions):
    """Train or fine-tune the current model as a causal LM."""

    kind: ClassVar[str] = "train"
    trains: ClassVar[bool] = True
    adapter: AdapterSpec | None = None
    """Train low-rank adapters (peft) instead of every weight; the output is the merged model, the
    adapter is saved beside it (steps/NN-train/adapter)."""

    @model_validator(mode="after")
    def _precision_of_adapter(self) -> TrainStep:
        if self.precision == "checkpoint" and self.adapter is not None and self.adapter.method == "qlora":
            raise ValueError("precision checkpoint: a qlora base is 4-bit, it has no checkpoint dtype to train in; "
                             "use precision bf16, fp16 or fp32")
        return self


Metric = Literal["perplexity", "accuracy", "latency", "size", "memory"]
DEFAULT_METRICS: tuple[Metric, ...] = ("perplexity", "accuracy", "latency", "size")


def _task_entry(entry: str) -> str:
    from .evaltasks import name_problem

    if (problem := name_problem(entry)) is not None:
        raise ValueError(problem)
    return entry


#: An lm-eval registry task name or a local task file (``specs.evaltasks``).
TaskEntry = Annotated[str, AfterValidator(_task_entry)]


class EvaluateStep(StepBase):
    """Measure the current model: quality, speed and size."""

    kind: ClassVar[str] = "evaluate"
    metrics: list[Metric] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    """Which measurements to take."""
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    """Sequences per evaluation batch."""
    max_batches: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Evaluate on at most this many batches (default: the whole eval split)."""
    latency_repeats: int = Field(5, ge=1, le=1000)
    """Least repeats for latency medians (more, up to 10x, until 0.15 s has been timed)."""
    generate_tokens: int = Field(32, ge=1, le=4096)
    """Tokens to generate when timing generation."""
    tasks: list[TaskEntry] = Field(default_factory=list, max_length=64)
    """Benchmark tasks run through lm-evaluation-harness (the ``eval`` extra): names from its registry
    (e.g. hellaswag, arc_easy; their datasets download on the node: it needs the network) or local task
    YAML files (``.yaml``, data files beside them). Each task's metrics become ``task:NAME:METRIC``."""
    task_limit: int | None = Field(None, ge=1, le=10_000_000)
    """Score at most this many examples of each task (default: all)."""
    task_fewshot: int | None = Field(None, ge=0, le=64)
    """Few-shot examples in each prompt (default: the task's own setting, usually 0)."""

    @model_validator(mode="after")
    def _tasks_once(self) -> EvaluateStep:
        if len(set(self.tasks)) < len(self.tasks):
            raise ValueError("tasks: a task is listed twice")
        return self

    def task_tokens(self) -> int:
        """Forward tokens the tasks cost, roughly (``evaltasks.EXAMPLES_PER_TASK`` examples of
        ``evaltasks.TOKENS_PER_EXAMPLE`` tokens each, or ``task_limit`` examples), for the plan."""
        from .evaltasks import EXAMPLES_PER_TASK, TOKENS_PER_EXAMPLE

        examples = EXAMPLES_PER_TASK if self.task_limit is None else min(self.task_limit, EXAMPLES_PER_TASK)
        return len(self.tasks) * examples * TOKENS_PER_EXAMPLE * (1 + (self.task_fewshot or 0))


#: optuna keeps every parameter as a float internally: integers beyond 2**53 would not round-trip.
_SearchInt = Annotated[builtins.int, Field(ge=-(2**53), le=2**53)]


class Distribution(StrictModel):
    """One search dimension; give exactly one key."""

    log_uniform: tuple[float, float] | None = None
    """Float sampled log-uniformly in [low, high]."""
    uniform: tuple[float, float] | None = None
    """Float sampled uniformly in [low, high]."""
    int: tuple[_SearchInt, _SearchInt] | None = None
    """Integer in [low, high]."""
    choice: list[Any] | None = Field(None, min_length=1)
    """One of these values."""

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in ("log_uniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of log_uniform, uniform, int, choice")
        for key in ("log_uniform", "uniform", "int"):
            bounds = getattr(self, key)
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ValueError(f"{key}: low {bounds[0]} is above high {bounds[1]}")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform bounds must be positive")
        return self


class HpoStep(StepBase):
    """Hyperparameter search over the next train/distill step and model.init fields."""

    kind: ClassVar[str] = "hpo"
    trials: int = Field(8, ge=1, le=10000)
    """Trials to run (in total, across resumes)."""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """Optuna sampler."""
    metric: Literal["eval_loss", "perplexity", "accuracy"] = "eval_loss"
    """What a trial reports."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether lower or higher is better."""
    trial_steps: int = Field(60, ge=1, le=MAX_STEPS)
    """Optimizer steps per trial."""
    pruner: Literal["median", "none"] = "median"
    """Stop unpromising trials early."""
    seed: Seed = 0
    """Sampler seed."""
    space: dict[str, Distribution] = Field(min_length=1)
    """Search space: ``train.lr``, ``distill.alpha``, ``model.init.layers``, ..."""


class Calibration(StrictModel):
    """Calibration data of a one-shot method: random windows of the job's train split."""

    samples: int = Field(128, ge=1, le=1_000_000)
    """Windows (the Wanda, SparseGPT and GPTQ papers use 128)."""
    seq_len: int | None = Field(None, ge=2, le=1_048_576)
    """Tokens per window (default: data.seq_len)."""
    seed: Seed = 0
    """Which windows are drawn."""


#: unstructured, or N:M: N of every M consecutive input weights of each output row are zeroed.
SparsityPattern = Literal["unstructured", "2:4", "4:8"]
_ONE_SHOT_PRUNE = ("wanda", "sparsegpt")


class PruneStep(StepBase):
    """Remove weights (magnitude, wanda, sparsegpt) or whole neurons and heads (structured)."""

    kind: ClassVar[str] = "prune"
    trains: ClassVar[bool] = True
    method: Literal["magnitude", "structured", "wanda", "sparsegpt"] = "magnitude"
    """magnitude: global L1; wanda: |W| x input norm per output row; sparsegpt: one-shot with
    weight reconstruction (both calibrated layer by layer); structured: drop MLP neurons / attention heads."""
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    """Fraction of Linear weights zeroed (magnitude, wanda, sparsegpt; an N:M pattern fixes it at N/M)."""
    pattern: SparsityPattern = "unstructured"
    """unstructured, or N:M (2:4 is the sparsity NVIDIA sparse tensor cores run): magnitude, wanda, sparsegpt."""
    calibration: Calibration = Field(default_factory=Calibration)
    """Calibration windows (wanda, sparsegpt)."""
    mlp_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of MLP neurons removed per layer (structured)."""
    heads_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of attention heads removed per layer (structured)."""
    recover_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """Fine-tune steps after pruning, masks kept."""
    lr: float = Field(1e-4, gt=0.0)
    """Learning rate of the recovery fine-tune."""
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    """Batch size of the recovery fine-tune."""
    seed: Seed = 0
    """Seed of the recovery fine-tune."""

    @model_validator(mode="after")
    def _checks(self) -> PruneStep:
        if self.method == "structured" and self.mlp_fraction == 0 and self.heads_fraction == 0:
            raise ValueError("structured pruning needs mlp_fraction or heads_fraction above 0")
        # Options are checked against their defaults, not against what was written: a dumped
        # and re-validated spec (job.json, the dry run's proxy) carries every field.
        if self.pattern != "unstructured":
            if self.method == "structured":
                raise ValueError(f"pattern {self.pattern} applies to magnitude, wanda and sparsegpt, not structured")
            n, m = (int(x) for x in self.pattern.split(":"))
            if self.sparsity != n / m:
                raise ValueError(f"pattern {self.pattern} zeroes exactly {n / m:g} of the weights; "
                                 f"drop sparsity or set it to {n / m:g}")
        if self.calibration != Calibration() and self.method not in _ONE_SHOT_PRUNE:
            raise ValueError(f"calibration applies to wanda and sparsegpt, not {self.method}")
        return self


class StudentSpec(StrictModel):
    """The student's architecture as changes to the teacher's."""

    layers: int | None = Field(None, ge=1, le=256)
    """Student layers."""
    hidden: int | None = Field(None, ge=8, le=65536)
    """Student width (forces init: random)."""
    heads: int | None = Field(None, ge=1, le=512)
    """Student heads."""
    intermediate: int | None = Field(None, ge=8, le=262144)
    """Student MLP width."""


class DistillStep(TrainOptions):
    """Distil the current model (teacher) into a smaller student."""

    kind: ClassVar[str] = "distill"
    trains: ClassVar[bool] = True
    student: StudentSpec = Field(default_factory=StudentSpec)
    """How the student differs from the teacher."""
    init: Literal["teacher_layers", "random"] = "teacher_layers"
    """Copy every k-th teacher layer into the student, or start from random."""
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    """Softmax temperature for the KL term."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the KL term; 1 - alpha weighs the hard-label loss."""


QuantMethod = Literal["fp16", "bf16", "int8-dynamic", "int8-weight", "int4-weight", "gptq", "rtn"]
_GROUPWISE = ("gptq", "rtn")


class QuantizeStep(StepBase):
    """Quantize the current model's weights."""

    kind: ClassVar[str] = "quantize"
    method: QuantMethod = "int8-dynamic"
    """fp16/bf16 cast, int8-dynamic (torch), int8-weight/int4-weight (torchao), gptq (calibrated,
    layer by layer) / rtn (round to nearest): group-wise asymmetric int4/int8 weights."""
    group_size: int = Field(128, ge=16, le=65536)
    """Inputs per quantization group (int4-weight, gptq, rtn)."""
    bits: Literal[4, 8] = 4
    """Bits per weight (gptq, rtn)."""
    calibration: Calibration = Field(default_factory=Calibration)
    """Calibration windows (gptq)."""

    @model_validator(mode="after")
    def _checks(self) -> QuantizeStep:
        # Against the defaults, as PruneStep does (a re-validated dump carries every field).
        if self.bits != 4 and self.method not in _GROUPWISE:
            raise ValueError(f"bits applies to gptq and rtn; {self.method} fixes its own width")
        if self.calibration != Calibration() and self.method != "gptq":
            raise ValueError(f"calibration applies to gptq, not {self.method}")
        return self


#: A variant's name (checked by ``JobSpec``): it names its folder (steps/NN-compare/NAME) and its report row.
VARIANT_NAME = r"^[a-z][a-z0-9_-]{0,31}$"


class CompareStep(RootModel[dict[str, "list[Step]"]]):
    """Several recipes from the same parent: ``{NAME: [steps...]}``, each variant a short pipeline
    that starts from the model before the compare step (the last step of a spec)."""

    model_config = ConfigDict(frozen=True)
    kind: ClassVar[str] = "compare"

    @model_validator(mode="after")
    def _checks(self) -> CompareStep:
        if not self.root:
            raise ValueError("compare needs at least one variant, e.g. {wanda: [{prune: {method: wanda}}]}")
        for name, steps in self.root.items():
            if not steps:
                raise ValueError(f"variant {name} has no steps: give it at least one")
        return self

    @property
    def variants(self) -> dict[str, list[StepBase]]:
        """{variant name: its step models, in order}."""
        return {name: [entry.step for entry in steps] for name, steps in self.root.items()}  # type: ignore[misc]


STEP_TYPES: dict[str, type[StepBase] | type[CompareStep]] = {
    cls.kind: cls
    for cls in (TrainStep, EvaluateStep, HpoStep, PruneStep, DistillStep, QuantizeStep, CompareStep)
}


def _entry_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    if isinstance(value, _Entry):  # serialising
        return next(iter(type(value).model_fields))
    return None


def _check_entry(value: Any) -> Any:
    """Before the union: exactly one known key; ``- evaluate:`` (null) means defaults."""
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "step_shape", "a step is a mapping with one key, the step kind, e.g. '- train: {max_steps: 100}'"
        )
    if len(value) != 1:
        keys = ", ".join(map(str, value)) or "none"
        raise PydanticCustomError(
            "step_shape", "a step has exactly one key, the step kind (got: {keys})", {"keys": keys}
        )
    key, body = next(iter(value.items()))
    if key not in STEP_TYPES:
        close = difflib.get_close_matches(str(key), STEP_TYPES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(STEP_TYPES)}"
        raise PydanticCustomError("step_kind", "unknown step kind '{key}'{hint}", {"key": key, "hint": hint})
    return {key: {} if body is None else body}


class _Entry(StrictModel):
    @property
    def step(self) -> StepBase:
        return getattr(self, next(iter(type(self).model_fields)))  # type: ignore[no-any-return]


class TrainEntry(_Entry):
    train: TrainStep
    """A train step (see TrainStep)."""


class EvaluateEntry(_Entry):
    evaluate: EvaluateStep
    """A evaluate step (see EvaluateStep)."""


class HpoEntry(_Entry):
    hpo: HpoStep
    """A hpo step (see HpoStep)."""


class PruneEntry(_Entry):
    prune: PruneStep
    """A prune step (see PruneStep)."""


class DistillEntry(_Entry):
    distill: DistillStep
    """A distill step (see DistillStep)."""


class QuantizeEntry(_Entry):
    quantize: QuantizeStep
    """A quantize step (see QuantizeStep)."""


class CompareEntry(_Entry):
    compare: CompareStep
    """Several recipes side by side (see CompareStep)."""


StepEntry = Annotated[
    Annotated[TrainEntry, Tag("train")]
    | Annotated[EvaluateEntry, Tag("evaluate")]
    | Annotated[HpoEntry, Tag("hpo")]
    | Annotated[PruneEntry, Tag("prune")]
    | Annotated[DistillEntry, Tag("distill")]
    | Annotated[QuantizeEntry, Tag("quantize")]
    | Annotated[CompareEntry, Tag("compare")],
    Discriminator(_entry_kind),
]


#: One item of ``steps:`` as the user writes it.
Step = Annotated[StepEntry, BeforeValidator(_check_entry)]
CompareStep.model_rebuild()


__all__ = [
    "ADAPTER_SEARCH_FIELDS",
    "STEP_TYPES",
    "VARIANT_NAME",
    "AdapterSpec",
    "Calibration",
    "CompareEntry",
    "CompareStep",
    "DistillStep",
    "Distribution",
    "EvaluateStep",
    "HpoStep",
    "PruneStep",
    "QuantizeStep",
    "Step",
    "StepBase",
    "StepEntry",
    "TrainOptions",
    "TrainStep",
]
