"""What each step can do to a model family, told from its config alone (no torch).

The steps find attention and MLP projections by structure at run time (``structure``);
this module predicts, from a transformers config (a ``PretrainedConfig`` or the dict of a
``config.json``), what they will refuse, so a planner can say so before anything runs::

    unsupported_reason(config, step)  # -> "why; what to do instead", or None

``None`` means "not known to be unsupported": for a model type this module has not been
checked against (``CHECKED``), the step still decides from the model's structure.
The steps call ``check`` themselves before they start, so a refusal reads the same at
validate time and at run time, with a hint that fits the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optjob.specs.errors import StepError

#: Model types whose attention takes its head width from hidden / heads: a model with
#: fewer heads but the same width cannot be written as a config of that type.
HEAD_DIM_FROM_HIDDEN = frozenset({"gpt2", "gpt_bigcode", "gpt_neox", "opt"})
#: Model types the structural steps are tested on (tests/steps/test_families.py).
CHECKED = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt", "gpt2"}
)
#: Config fields that name a mixture-of-experts MLP.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
#: gpt2 options with no nn.Linear twin that transformers loads (see ``structure.gpt2_to_linear``).
GPT2_ONLY_OPTIONS = ("scale_attn_by_inverse_layer_idx", "add_cross_attention")

# Field names for the same quantity across families (config.json keys; a
# PretrainedConfig also answers the first name of each through its attribute_map).
HIDDEN = ("hidden_size", "n_embd", "d_model")
HEADS = ("num_attention_heads", "n_head")
LAYERS = ("num_hidden_layers", "n_layer")
KV_HEADS = ("num_key_value_heads",)
#: The MLP width: llama & co, gpt2 (None: 4 x hidden), opt.
INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_dim")


@dataclass(frozen=True)
class Unsupported:
    reason: str
    hint: str

    def __str__(self) -> str:
        return f"{self.reason}; {self.hint}"


def field(config: Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` (object or mapping) sets, else None."""
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_type(config: Any) -> str:
    return str(field(config, "model_type") or "?")


def hidden_size(config: Any) -> int | None:
    value = field(config, *HIDDEN)
    return int(value) if value is not None else None


def num_heads(config: Any) -> int | None:
    value = field(config, *HEADS)
    return int(value) if value is not None else None


def num_kv_heads(config: Any) -> int | None:
    """Key/value heads: the explicit field, 1 for multi-query gpt_bigcode, else the heads."""
    value = field(config, *KV_HEADS)
    if value is not None:
        return int(value)
    if field(config, "multi_query"):
        return 1
    return num_heads(config)


def head_dim(config: Any) -> int | None:
    value = field(config, "head_dim")
    if value is not None:
        return int(value)
    hidden, heads = hidden_size(config), num_heads(config)
    return hidden // heads if hidden and heads else None


def intermediate_field(config: Any) -> str | None:
    """The name of the config field that sets the MLP width (as the config spells it)."""
    for name in INTERMEDIATE:
        present = name in config if isinstance(config, Mapping) else hasattr(config, name)
        if present:
            return name
    return None


def intermediate_size(config: Any) -> int | None:
    """The MLP width (gpt2's ``n_inner: null`` is 4 x hidden)."""
    name = intermediate_field(config)
    if name is None:
        return None
    value = field(config, name)
    if value is None and name == "n_inner":
        hidden = hidden_size(config)
        return 4 * hidden if hidden else None
    return int(value) if value is not None else None


def is_moe(config: Any) -> bool:
    return any((field(config, name) or 0) > 1 for name in MOE_FIELDS)


def heads_kept(n_heads: int, fraction: float) -> int:
    """Heads a structured prune of ``fraction`` keeps (the step's own rounding)."""
    return n_heads - int(n_heads * fraction)


def _heads_fraction_hint(n_heads: int, n_kv: int) -> str:
    # the smallest 4-decimal fraction whose cut (int(n * f)) leaves exactly k heads
    good = sorted({math.ceil((n_heads - k) / n_heads * 10_000) / 10_000 for k in range(n_kv, n_heads, n_kv)})
    if not good:
        return "set heads_fraction: 0 (every kept group needs a key/value head)"
    shown = ", ".join(str(g) for g in good[:4])
    return f"choose heads_fraction so the heads kept are a multiple of {n_kv} (e.g. {shown})"


def _heads_unsupported(config: Any, kind: str) -> Unsupported | None:
    family = model_type(config)
    if family in HEAD_DIM_FROM_HIDDEN:
        reason = (
            f"{family} takes its head width from hidden / heads, so a model with fewer heads "
            "of the same width cannot be written as its config"
        )
        if kind == "prune":
            return Unsupported(reason, "prune MLP neurons only (heads_fraction: 0), or use method: magnitude")
        return Unsupported(
            reason, "leave student.heads unset with init: teacher_layers, or use init: random"
        )
    return None


def unsupported(config: Any, step: Any) -> Unsupported | None:
    """Why ``step`` (a spec step) cannot run on a model of ``config``, or None."""
    kind = getattr(step, "kind", None)
    if kind == "prune":
        return _prune(config, step)
    if kind == "distill":
        return _distill(config, step)
    if kind == "quantize":
        return _quantize(config, step)
    return None


def unsupported_reason(config: Any, step: Any) -> str | None:
    """``unsupported`` as one line ("why; what to do instead"), or None."""
    found = unsupported(config, step)
    return str(found) if found is not None else None


def check(config: Any, step: Any) -> None:
    """Raise the step's ``StepError`` when ``unsupported`` finds a reason."""
    found = unsupported(config, step)
    if found is not None:
        raise StepError(found.reason, hint=found.hint)


def _prune(config: Any, step: Any) -> Unsupported | None:
    if step.method != "structured":
        return None
    family = model_type(config)
    if step.mlp_fraction > 0 and is_moe(config):
        return Unsupported(
            f"{family} has mixture-of-experts MLPs; structured pruning cuts neurons of dense MLPs",
            "set mlp_fraction: 0, or use method: magnitude",
        )
    if step.heads_fraction <= 0:
        return None
    found = _heads_unsupported(config, "prune")
    if found is not None:
        return found
    n_heads, n_kv = num_heads(config), num_kv_heads(config)
    if not n_heads or not n_kv:
        return None
    keep = heads_kept(n_heads, step.heads_fraction)
    if keep < 1:
        return Unsupported(
            f"heads_fraction {step.heads_fraction} removes every one of the {n_heads} attention heads",
            "use a smaller heads_fraction",
        )
    if n_kv != n_heads and keep % n_kv:
        return Unsupported(
            f"keeping {keep} of {n_heads} attention heads does not split evenly over the "
            f"{n_kv} key/value heads (grouped-query attention)",
            _heads_fraction_hint(n_heads, n_kv),
        )
    return None


def _distill(config: Any, step: Any) -> Unsupported | None:
    student = step.student
    family = model_type(config)
    n_layers = field(config, *LAYERS)
    if student.layers is not None and n_layers and student.layers > int(n_layers):
        return Unsupported(
            f"a student of {student.layers} layers cannot be taken from {n_layers} teacher layers",
            f"set student.layers to at most {n_layers}",
        )
    hidden, n_heads = hidden_size(config), num_heads(config)
    if step.init == "random":
        width, heads = student.hidden or hidden, student.heads or n_heads
        if width and heads and width % heads:
            return Unsupported(
                f"the student's hidden width {width} is not divisible by its {heads} heads",
                "choose student.hidden and student.heads so that heads divides hidden",
            )
        return None
    if student.hidden is not None and student.hidden != hidden:
        return Unsupported(
            f"init: teacher_layers copies the teacher's weights, so the student keeps the "
            f"teacher's hidden width ({hidden})",
            "use init: random for a narrower student",
        )
    if student.intermediate is not None:
        width = intermediate_size(config)
        if is_moe(config):
            return Unsupported(
                f"{family} has mixture-of-experts MLPs, whose neurons cannot be cut from copied layers",
                "leave student.intermediate unset, or use init: random",
            )
        if width is not None and student.intermediate > width:
            return Unsupported(
                f"student.intermediate {student.intermediate} is wider than the teacher's MLP ({width})",
                f"set student.intermediate to at most {width}, or use init: random",
            )
    if student.heads is not None and n_heads and student.heads != n_heads:
        found = _heads_unsupported(config, "distill")
        if found is not None:
            return found
        n_kv = num_kv_heads(config) or n_heads
        if student.heads > n_heads:
            return Unsupported(
                f"student.heads {student.heads} is more than the teacher's {n_heads} heads",
                f"set student.heads to at most {n_heads}, or use init: random",
            )
        if n_kv != n_heads and student.heads % n_kv:
            return Unsupported(
                f"a student with {student.heads} of the teacher's {n_heads} heads does not split "
                f"evenly over its {n_kv} key/value heads (grouped-query attention)",
                f"set student.heads to a multiple of {n_kv}, or use init: random",
            )
    return None


def _quantize(config: Any, step: Any) -> Unsupported | None:
    existing = field(config, "quantization_config")
    if existing is not None:
        method = field(existing, "quant_method") or "?"
        return Unsupported(
            f"the model is already quantized ({method})",
            "quantize the float model once (drop this step or start from the float checkpoint)",
        )
    if step.method in ("fp16", "bf16"):
        return None
    family = model_type(config)
    if family == "gpt2":
        options = [name for name in GPT2_ONLY_OPTIONS if field(config, name)]
        if options:
            return Unsupported(
                f"gpt2 with {', '.join(options)} has no nn.Linear twin that transformers can "
                f"load, so its {step.method} weights could not be saved loadably",
                "use method: fp16 or bf16",
            )
    return None
