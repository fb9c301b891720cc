"""``distill``: train a smaller student to match the current model (the teacher).

The student's config is the teacher's with ``student.layers / hidden / heads /
intermediate`` changed. ``init: teacher_layers`` copies the embeddings, the final
norm, the output head and evenly spaced teacher layers (every k-th, k = teacher
layers / student layers), then cuts MLP neurons / heads the student lacks with the
structured-pruning importance scores; ``init: random`` builds it fresh from ``seed``.

Loss = alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * CE.
Training goes through ``train_loop`` (checkpoints, exact resume, progress events).
Under torchrun it is data-parallel like ``train``: every rank holds the teacher and a
student replica (DDP) and works on its block of the global batch (see ``dist``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from optjob.specs import DistillStep
from optjob.specs.errors import StepError
from torch import nn

from . import dist, families, structure
from .context import StepContext, StepOutcome
from .prune import rebuild, shrink

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def pick_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers: every k-th when k = n_teacher / n_student is whole."""
    if not 1 <= n_student <= n_teacher:
        raise StepError(f"a student of {n_student} layers cannot be taken from {n_teacher} layers")
    return [i * n_teacher // n_student for i in range(n_student)]


def _set(config: Any, names: tuple[str, ...], value: Any) -> None:
    for name in names:
        if hasattr(config, name):
            setattr(config, name, value)
            return
    setattr(config, names[0], value)


def _with_layers(config: Any, layers: list[int]) -> Any:
    new = copy.deepcopy(config)
    _set(new, families.LAYERS, len(layers))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == families.field(config, *families.LAYERS):
        new.layer_types = [types[i] for i in layers]
    return new


def student_config(teacher_config: Any, step: DistillStep) -> Any:
    """The config of a randomly initialised student: the teacher's, with the student's
    layers, width, heads and MLP width set in whatever fields the family names them
    (gpt2's n_embd/n_head/n_inner, opt's ffn_dim and word_embed_proj_dim, ...)."""
    s = step.student
    t_hidden = families.hidden_size(teacher_config)
    t_heads = families.num_heads(teacher_config)
    t_layers = int(families.field(teacher_config, *families.LAYERS))
    assert t_hidden is not None and t_heads is not None
    cfg = _with_layers(teacher_config, list(range(s.layers or t_layers)))
    hidden = s.hidden or t_hidden
    heads = s.heads or t_heads
    if hidden % heads:
        raise StepError(f"student hidden {hidden} is not divisible by its {heads} heads")
    cfg.hidden_size = hidden
    cfg.num_attention_heads = heads
    if getattr(cfg, "num_key_value_heads", None) is not None:
        kv = families.num_kv_heads(teacher_config) or t_heads
        same = kv == t_heads
        cfg.num_key_value_heads = heads if same or heads % kv else kv
    t_head_dim = families.head_dim(teacher_config)
    if s.hidden is not None or s.heads is not None:
        if hasattr(cfg, "head_dim"):
            cfg.head_dim = hidden // heads
        # gemma2 scales attention by query_pre_attn_scalar, set to the head width
        if getattr(cfg, "query_pre_attn_scalar", None) == t_head_dim:
            cfg.query_pre_attn_scalar = hidden // heads
    # opt embeds in word_embed_proj_dim; equal to hidden it needs no project_in/out
    if getattr(cfg, "word_embed_proj_dim", None) == t_hidden:
        cfg.word_embed_proj_dim = hidden
    if s.intermediate is not None:
        name = families.intermediate_field(cfg)
        if name is None:
            raise StepError(
                f"no field of the {families.model_type(cfg)} config gives the MLP width",
                hint="leave student.intermediate unset",
            )
        setattr(cfg, name, s.intermediate)
    return cfg


def copy_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A model with ``layers`` of ``teacher`` (in order) and its embeddings, final norm
    and output head."""
    name, _ = structure.decoder_layers(teacher)
    prefix = f"{name}."
    state: dict[str, torch.Tensor] = {}
    where = {t: s for s, t in enumerate(layers)}
    for key, value in teacher.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        if int(index) in where:
            state[f"{prefix}{where[int(index)]}.{rest}"] = value
    return rebuild(teacher, _with_layers(teacher.config, layers), state)


#: What to do when the student's layers cannot be cut from the teacher's.
SHRINK_HINT = "use init: random, or leave student.heads / student.intermediate unset"


def build_student(teacher: nn.Module, step: DistillStep, device: torch.device) -> nn.Module:
    """The student, in fp32 on ``device`` (whatever the teacher's dtype)."""
    s = step.student
    cfg: Any = teacher.config
    families.check(cfg, step)
    if step.init == "random":
        from .modeling import build_from_config

        fresh: nn.Module = build_from_config(student_config(cfg, step), seed=step.seed)
        return fresh.to(device)
    n_layers = int(families.field(cfg, *families.LAYERS))
    student = copy_layers(teacher, pick_layers(n_layers, s.layers or n_layers))
    if s.intermediate is not None or s.heads is not None:
        student = shrink(student, intermediate=s.intermediate, heads=s.heads, hint=SHRINK_HINT)
    return student.to(device=device, dtype=torch.float32)


def distill_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """``loss_fn(student, batch[B, T+1])`` for ``train_loop``."""

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = batch[:, :-1], batch[:, 1:]
        student = model(input_ids=inputs).logits.float()
        vocab = student.shape[-1]
        student = student.reshape(-1, vocab)
        ce = F.cross_entropy(student, labels.reshape(-1))
        if alpha == 0:
            return ce
        with torch.no_grad():
            target = teacher(input_ids=inputs.to(_device(teacher))).logits.float()
        target = target.reshape(-1, vocab).to(student.device)
        kl = F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(target / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return alpha * kl * temperature**2 + (1 - alpha) * ce

    return loss_fn


def _config(model: nn.Module) -> Any:
    return model.config


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.state_dict().values())).device


def prepare_teacher(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def distill_train(
    ctx: StepContext, teacher: nn.Module, step: DistillStep, **train_kwargs: Any
) -> tuple[nn.Module, Any]:
    """Build the student and train it against ``teacher``: ``(student, TrainResult)``.
    ``train_kwargs`` go to ``train_loop`` (checkpoint_dir, emit, report, distributed)."""
    from .train import train_loop

    teacher = prepare_teacher(teacher)
    student = build_student(teacher, step, ctx.device)
    loss_fn = distill_loss(teacher, step.temperature, step.alpha)
    result = train_loop(ctx, student, step, loss_fn=loss_fn, **train_kwargs)
    return result.model, result


def preflight(step: DistillStep, device: torch.device) -> None:
    """Under torchrun, the global ``batch_size`` must split evenly among the processes."""
    dist.split_batch(step.batch_size)


def run(ctx: StepContext, step: DistillStep, model: nn.Module) -> StepOutcome:
    from .modeling import count_params

    teacher_params = count_params(model)
    teacher_dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point()))
    n_teacher = int(families.field(_config(model), *families.LAYERS))
    student, result = distill_train(
        ctx, model, step, checkpoint_dir=ctx.step_dir() / "checkpoints", distributed=True
    )
    n_student = int(families.field(_config(student), *families.LAYERS))
    student_params = count_params(student)
    metrics: dict[str, Any] = {
        "teacher_params": teacher_params,
        "student_params": student_params,
        "compression": teacher_params / student_params,
        "student_layers": n_student,
        "teacher_dtype": teacher_dtype.removeprefix("torch."),
        "student_dtype": "float32",
        "steps_done": result.steps_done,
        "tokens_per_s": result.tokens_per_s,
    }
    if step.init == "teacher_layers":
        metrics["teacher_layers_used"] = pick_layers(n_teacher, n_student)
    if result.losses:
        metrics["final_loss"] = result.losses[-1][1]
    if result.best_eval_loss is not None:
        metrics["best_eval_loss"] = result.best_eval_loss
    return StepOutcome(model=student, metrics=metrics, extra={"losses": result.losses})
