"""Workload -> duration -> cost: what a spec costs to COMPLETE on an offer, and which offer to pick.

Per step: tokens processed x FLOPs per token (6N to train, 4N + 6N_adapter under LoRA, 2N forward,
2N_teacher + 6N_student to distill, 2N (Wanda) or 4N (SparseGPT, GPTQ) per calibration token) / (peak
FLOP/s of the nodes x efficiency) + 5 s fixed, plus the automatic evaluation the runner makes of every
step's output (generated tokens at least ``DECODE_S_PER_TOKEN`` each). Around the steps: provisioning
(start-up and the baseline evaluation locally, 180 s on-demand, 300 s spot), setup (120 s on a
cloud), the hub download of an ``hf`` model (2 bytes/param at 200 MB/s), and the stop reserve
(``meter.stop_margin_s``). Efficiency defaults to 0.35; finished runs calibrate it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from optjob.specs.steps import (
    DistillStep,
    EvaluateStep,
    HpoStep,
    PruneStep,
    QuantizeStep,
    StepBase,
    TrainOptions,
    TrainStep,
)

from ..meter import stop_margin_s
from .accelerators import KNOWN_MODELS, known, node_peak_flops
from .calibration import calibrated_efficiency
from .offers import Offer, PlanChoice, choose

if TYPE_CHECKING:
    from optjob.specs.data import DataSpec
    from optjob.specs.job import JobSpec
    from optjob.specs.model import ModelInit, ModelSpec

DEFAULT_EFFICIENCY = 0.35
#: Local "provisioning" is the workload's start-up and end (interpreter, torch, corpus and tokenizer
#: from cache, baseline evaluation, exit): about 5 s measured here (benchmarks/estimate.py: metered
#: seconds less the steps' own).
PROVISION_S = {"local": 5.0, "ondemand": 180.0, "spot": 300.0}
SETUP_S = 120.0
STEP_FIXED_S = 5.0
#: Per-step fixed cost on this machine (save the model, write done.json): about 0.5 s measured.
LOCAL_STEP_FIXED_S = 0.5
#: A generated token is one forward call of its own: at least this long, whatever its FLOPs
#: (kernel launches and Python per call; measured about 3-5 ms a token for small models here).
DECODE_S_PER_TOKEN = 0.003
#: torchao's int8 dynamic activation quantization decodes about 3x slower per token on CPU than fp32
#: (measured 3.1-3.4x, one thread, llama 2x128 and 4x256): every evaluation after it pays that.
INT8_DYNAMIC_DECODE_FACTOR = 3.0
#: One-shot methods' calibration pass, FLOPs per parameter per calibration token: the layer-by-layer
#: forward (2); SparseGPT and GPTQ also accumulate each layer's Hessian (about one forward more).
CALIBRATION_FLOPS_PER_PARAM = {"wanda": 2.0, "sparsegpt": 4.0, "gptq": 4.0}
DOWNLOAD_BYTES_PER_S = 200e6
BYTES_PER_PARAM = 2  # hub checkpoints are mostly bf16/fp16 safetensors


@dataclass(frozen=True)
class StepEstimate:
    """One step: tokens processed, FLOPs, seconds (unpacks as that 5-tuple)."""

    index: int
    kind: str
    tokens: int
    flops: float
    seconds: float
    #: A ``compare`` variant's step: its name and place in the variant (``index`` is compare's).
    variant: str | None = None
    variant_step: int | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.index, self.kind, self.tokens, self.flops, self.seconds))


@dataclass(frozen=True)
class Estimate:
    offer: Offer
    total_hours: float
    total_usd: float
    steps: list[StepEstimate]
    efficiency: float
    calibrated_runs: int
    notes: list[str] = field(default_factory=list)
    params: int = 0
    overhead_seconds: float = 0.0
    #: The same run on demand: for a spot offer, the fallback if spot capacity is lost.
    ondemand_usd: float | None = None

def overhead_seconds(spec: JobSpec, offer: Offer, *, spot: bool | None = None) -> float:
    """Provisioning + setup + model download + the stop reserve; every step also pays
    :data:`STEP_FIXED_S`.

    The stop reserve is budget a run can never spend on its steps: the workload's deadline sits
    that far before the cap (one checkpoint write and the provider's teardown margin,
    ``meter.stop_margin_s``), so a plan that fits only without it would be stopped short."""
    spot = offer.spot if spot is None else spot
    if offer.cloud == "local":
        fixed = PROVISION_S["local"] + stop_margin_s("local", None, spec)
    else:
        fixed = PROVISION_S["spot" if spot else "ondemand"] + SETUP_S + stop_margin_s("skypilot", None, spec)
    if spec.model.hf is not None:
        fixed += model_params(spec.model)[0] * BYTES_PER_PARAM / DOWNLOAD_BYTES_PER_S
    return fixed


def estimate(spec: JobSpec, offer: Offer, *, efficiency: float = DEFAULT_EFFICIENCY,
             calibration: Iterable[Any] | None = None) -> Estimate:
    """Duration and cost of running every step of ``spec`` on ``resources.nodes`` x ``offer``.

    ``calibration``: finished-run records (see ``calibration.py``); where some match this
    accelerator and model size, their median efficiency replaces ``efficiency``.
    """
    work, params, notes = workload(spec)
    nodes = spec.resources.nodes
    runs = 0
    device = offer.accelerator_name or "cpu"
    if calibration is not None:
        found = calibrated_efficiency(calibration, params, device)
        if found is not None:
            efficiency, runs = found
            notes.append(f"efficiency {efficiency:.3f} calibrated from {runs} finished run(s) "
                         f"on {device}")
    if not known(offer.accelerator_name):
        notes.append(f"no peak throughput known for {offer.accelerator_name}: assumed 100 TFLOP/s")
    if offer.price_note:
        notes.append(offer.price_note)
    steps = [_step(w, offer, nodes, efficiency) for w in work]
    overhead = overhead_seconds(spec, offer)
    seconds = sum(s.seconds for s in steps) + overhead
    hours = seconds / 3600.0
    od = None
    if offer.spot:
        od_hours = (seconds - overhead + overhead_seconds(spec, offer, spot=False)) / 3600.0
        if offer.ondemand_hourly_usd is None:
            notes.append(f"no on-demand price for {offer.instance_type} in {offer.region}: "
                         "no fallback cost")
        else:
            od = od_hours * offer.ondemand_hourly_usd * nodes
    else:
        od = hours * offer.hourly_usd * nodes
    return Estimate(
        offer=offer, total_hours=hours, total_usd=hours * offer.hourly_usd * nodes, steps=steps,
        efficiency=efficiency, calibrated_runs=runs, notes=notes, params=params,
        overhead_seconds=overhead, ondemand_usd=od,
    )


def _step(w: StepWork, offer: Offer, nodes: int, efficiency: float) -> StepEstimate:
    peak = node_peak_flops(offer.accelerator_name, offer.accelerator_count, w.precision) * nodes
    fixed = LOCAL_STEP_FIXED_S if offer.cloud == "local" else STEP_FIXED_S
    seconds = w.flops / (peak * efficiency) + fixed + w.floor_s
    return StepEstimate(w.index, w.kind, w.tokens, w.flops, seconds, w.variant, w.variant_step)


def plan_offers(spec: JobSpec, offers: list[Offer], *, efficiency: float = DEFAULT_EFFICIENCY,
                calibration: Iterable[Any] | None = None) -> tuple[list[Estimate], PlanChoice]:
    """Estimate every offer and :func:`~.offers.choose` one (calibration records read once)."""
    records = list(calibration) if calibration is not None else None
    estimates = [estimate(spec, o, efficiency=efficiency, calibration=records) for o in offers]
    return estimates, choose(spec, offers, estimates)


# -- the workload ---------------------------------------------------------------------------------

ASSUMED_PARAMS = 1_000_000_000
CHARS_PER_TOKEN = 4
BUILTIN_CHARS = {"builtin:python-docs": 1_800_000}
UNKNOWN_CORPUS_TOKENS = 10_000_000


@dataclass(frozen=True)
class StepWork:
    index: int
    kind: str
    tokens: int
    flops: float
    precision: str
    #: Seconds no FLOP count explains: generated tokens are one sequential forward call each.
    floor_s: float = 0.0
    variant: str | None = None
    variant_step: int | None = None


def model_params(model: ModelSpec) -> tuple[int, int | None, str | None]:
    """(parameters, layers if known, a note when the count is a guess)."""
    if model.init is not None:
        return model.init.approx_params(), model.init.layers, None
    hub = (model.hf or "").lower()
    hub = hub.removesuffix("-instruct") if hub not in KNOWN_MODELS else hub
    params, layers = KNOWN_MODELS.get(hub, (None, None))
    if model.params is not None:
        return model.params, layers, None
    if params is not None:
        return params, layers, None
    if model.path is not None:  # a local folder: its config.json says
        from .model_shape import config_shape

        shape = config_shape(model.path)
        if shape is not None:
            return shape.params, shape.layers, None
    what = model.hf or model.path
    return ASSUMED_PARAMS, None, f"param count unknown for {what}: assumed 1B (set model.params)"


def train_flops_per_param(step: TrainOptions, adapter_share: float = 0.0) -> float:
    """Training FLOPs per token per model parameter: forward 2 + backward 4 (2 for the inputs'
    gradients, 2 for the weights'). Under an adapter the frozen weights need no weight gradient
    (forward 2 + backward 2) and the adapter's own ``adapter_share`` weights per model weight cost 6:
    4 + 6 x share. Gradient checkpointing runs the forward again (+2 per weight)."""
    adapted = getattr(step, "adapter", None) is not None
    total = 1.0 + adapter_share if adapted else 1.0  # weights each token passes through
    trained = adapter_share if adapted else 1.0  # weights that get a gradient of their own
    return 4.0 * total + 2.0 * trained + (2.0 * total if step.gradient_checkpointing else 0.0)


def adapter_share(step: StepBase, model: ModelSpec) -> float:
    """The adapter's weights per weight of the model a train step starts from (0 without one)."""
    adapter = getattr(step, "adapter", None)
    if adapter is None:
        return 0.0
    from .model_shape import model_shape

    shape = model_shape(model)[0]
    return shape.lora_params(adapter) / max(1, shape.params)


def compute_precision(step: TrainOptions, model: ModelSpec) -> str:
    """The precision whose peak a training step runs at: ``checkpoint`` trains in the starting
    model's own dtype (fp32 for ``model.init``; a folder's config.json says; hub models are half)."""
    if step.precision != "checkpoint":
        return step.precision
    from .model_shape import model_shape

    return "fp32" if model_shape(model)[0].dtype_bytes >= 4 else "bf16"


def corpus_tokens(data: DataSpec) -> tuple[int, str | None]:
    chars = BUILTIN_CHARS.get(data.source)
    if data.max_chars is not None:
        chars = min(chars, data.max_chars) if chars is not None else data.max_chars
    if chars is None:
        note = f"size of {data.source} unknown: assumed 10M tokens (set data.max_chars)"
        return UNKNOWN_CORPUS_TOKENS, note
    return max(1, chars // CHARS_PER_TOKEN), None


def _periodic_eval(step: TrainOptions, seq: int, eval_tokens: int) -> int:
    if step.eval_every is None:
        return 0
    evals = -(-step.max_steps // step.eval_every)
    return evals * min(eval_tokens, step.eval_batches * step.batch_size * seq)


def _student(step: DistillStep, n: int, layers: int | None, arch: ModelInit | None,
             notes: list[str]) -> tuple[int, int | None, ModelInit | None]:
    update = {k: v for k, v in step.student.model_dump().items() if v is not None}
    if arch is not None:
        merged = type(arch).model_validate({**arch.model_dump(), **update})
        return merged.approx_params(), merged.layers, merged
    ratio = 1.0
    if step.student.layers is not None:
        if layers:
            ratio = step.student.layers / layers
        else:
            ratio = 0.5
            notes.append("teacher layer count unknown: distill student assumed half the teacher")
    if step.student.hidden is not None or step.student.intermediate is not None:
        notes.append("student width ignored for a hub/path teacher (size scaled by layers only)")
    return max(1, int(n * ratio)), step.student.layers or layers, None


def _pruned(step: PruneStep, n: int, arch: ModelInit | None) -> tuple[int, ModelInit | None]:
    if step.method != "structured":
        return n, arch  # magnitude pruning zeroes weights; dense compute stays the same
    if arch is None:  # MLP ~2/3 and attention ~1/3 of a transformer block's weights
        return max(1, int(n * (1 - (2 * step.mlp_fraction + step.heads_fraction) / 3))), None
    kept = max(1, arch.heads - int(arch.heads * step.heads_fraction))
    kv = None if arch.kv_heads is None else max(1, min(arch.kv_heads, kept))
    mlp = arch.mlp_width - int(arch.mlp_width * step.mlp_fraction)
    new = arch.model_copy(update={"heads": kept, "kv_heads": kv, "intermediate": mlp})
    return new.approx_params(), new


def calibration_work(step: PruneStep | QuantizeStep, n: int, seq: int) -> tuple[int, float]:
    """(tokens, FLOPs) of a one-shot step's calibration pass over a model of ``n`` parameters."""
    per_param = CALIBRATION_FLOPS_PER_PARAM.get(step.method)
    if per_param is None:
        return 0, 0.0
    tokens = step.calibration.samples * (step.calibration.seq_len or seq)
    return tokens, per_param * n * tokens


def workload(spec: JobSpec) -> tuple[list[StepWork], int, list[str]]:
    """Tokens and FLOPs of each step as the model changes along the pipeline; also the starting
    parameter count and notes on every guess made."""
    n, layers, note = model_params(spec.model)
    start, arch = n, spec.model.init
    notes = [note] if note else []
    seq = spec.data.seq_len
    corpus, cnote = corpus_tokens(spec.data)
    if cnote:
        notes.append(cnote)
    eval_tokens = max(seq, int(corpus * spec.data.eval_fraction))
    steps: list[StepBase] = spec.pipeline
    auto_eval = AUTO_EVALUATE
    precision = "fp32"
    decode = 1.0  # how much slower than fp32 the current model generates a token
    out: list[StepWork] = []
    for i, step in enumerate(steps):
        tokens, flops = 0, 0.0
        if isinstance(step, TrainStep):
            precision = compute_precision(step, spec.model)
            train, ev = step.tokens(seq), _periodic_eval(step, seq, eval_tokens)
            per_param = train_flops_per_param(step, adapter_share(step, spec.model))
            tokens, flops = train + ev, per_param * n * train + 2.0 * n * ev
        elif isinstance(step, DistillStep):
            precision = "fp32" if step.precision == "checkpoint" else step.precision  # the student is fp32
            teacher = n
            n, layers, arch = _student(step, n, layers, arch, notes)
            train, ev = step.tokens(seq), _periodic_eval(step, seq, eval_tokens)
            tokens, flops = train + ev, (2.0 * teacher + train_flops_per_param(step) * n) * train + 2.0 * n * ev
        elif isinstance(step, HpoStep):
            nxt = next((s for s in steps[i + 1:] if isinstance(s, (TrainStep, DistillStep))), None)
            if nxt is not None:
                per_token = train_flops_per_param(nxt, adapter_share(nxt, spec.model)) * n
                if isinstance(nxt, DistillStep):
                    per_token = 2.0 * n + 6.0 * _student(nxt, n, layers, arch, [])[0]
                tokens = step.trials * step.trial_steps * nxt.batch_size * nxt.grad_accum * seq
                flops = per_token * tokens
                precision = compute_precision(nxt, spec.model) if isinstance(nxt, TrainStep) else (
                    "fp32" if nxt.precision == "checkpoint" else nxt.precision)
            if any(k.startswith("model.init.") for k in step.space):
                notes.append(f"steps[{i}] hpo varies model.init: trials priced at the current size")
        elif isinstance(step, PruneStep):
            cal_tokens, cal_flops = calibration_work(step, n, seq)
            n, arch = _pruned(step, n, arch)
            tokens = step.recover_steps * step.batch_size * seq
            tokens, flops = tokens + cal_tokens, 6.0 * n * tokens + cal_flops
        elif isinstance(step, QuantizeStep):
            tokens, flops = calibration_work(step, n, seq)
            decode = INT8_DYNAMIC_DECODE_FACTOR if step.method == "int8-dynamic" else 1.0
        elif isinstance(step, EvaluateStep):
            tokens, flops, floor = evaluation_work(step, n, seq, eval_tokens)
            out.append(StepWork(i, step.kind, tokens, flops, precision, floor * decode))
            continue
        if step.kind != "hpo":  # the runner measures every other step's output: the automatic evaluation
            ev_tokens, ev_flops, floor = evaluation_work(auto_eval, n, seq, eval_tokens)
            tokens, flops, floor = tokens + ev_tokens, flops + ev_flops, floor * decode
        else:
            floor = 0.0
        out.append(StepWork(i, step.kind, tokens, flops, precision, floor))
    for name in spec.variants:  # each compare variant from the model before compare, the steps before it once
        work, _, more = workload(spec.variant_spec(name))
        out += [replace(w, index=len(steps), variant=name, variant_step=w.index - len(steps))
                for w in work[len(steps):]]
        notes += [n for n in more if n not in notes]
    return out, start, notes


#: What the runner evaluates after every step and before the first (``steps.runner``'s default).
AUTO_EVALUATE = EvaluateStep()


def evaluation_work(step: EvaluateStep, n: int, seq: int, eval_tokens: int) -> tuple[int, float, float]:
    """(tokens, FLOPs, floor seconds) of one evaluation of a model of ``n`` parameters."""
    tokens = 0
    if {"perplexity", "accuracy"} & set(step.metrics):
        tokens = eval_tokens if step.max_batches is None else min(eval_tokens, step.max_batches * step.batch_size * seq)
    generated = step.latency_repeats * step.generate_tokens if "latency" in step.metrics else 0
    tokens += generated + step.task_tokens()  # lm-eval tasks: a rough per-example cost (specs.evaltasks)
    return tokens, 2.0 * n * tokens, generated * DECODE_S_PER_TOKEN
