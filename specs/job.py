"""``JobSpec`` — the whole spec, and the checks that span several sections."""

from __future__ import annotations

import functools
import re
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .base import StrictModel
from .data import DataSpec
from .integrations import NotifySpec, TrackingSpec
from .model import ModelInit, ModelSpec
from .resources import BudgetSpec, ResourcesSpec, StorageSpec, Teardown, storage_example
from .steps import (
    ADAPTER_SEARCH_FIELDS,
    STEP_TYPES,
    VARIANT_NAME,
    AdapterSpec,
    CompareEntry,
    CompareStep,
    DistillStep,
    Distribution,
    EvaluateStep,
    HpoStep,
    PruneStep,
    QuantizeStep,
    Step,
    StepBase,
    TrainStep,
)

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,39}$"
#: model.init fields an hpo search may vary.
HPO_ARCH_FIELDS = ("layers", "hidden", "heads", "intermediate", "activation", "dropout")


class PathError(ValueError):
    """A cross-field error that belongs to one place in the spec (``loc``), so the
    loader can point at that line instead of the document's top."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class JobSpec(StrictModel):
    """One optimization experiment: a model, a pipeline of steps, where to run it, and a budget."""

    name: str = Field(pattern=NAME_PATTERN)
    """Job name: lowercase letters, digits and dashes, starting with a letter (it names the cluster)."""
    model: ModelSpec
    """The starting model."""
    data: DataSpec = Field(default_factory=DataSpec)
    """The text to train and evaluate on."""
    steps: list[Step] = Field(min_length=1)
    """The pipeline, run in order; each step takes the model the previous one produced."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Hardware to run on."""
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    """Caps on dollars and hours."""
    teardown: Teardown = "always"
    """When to release resources: always, on_success, or never."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Where checkpoints and artifacts go."""
    notify: NotifySpec | None = None
    """A webhook to POST a JSON summary to when the job ends (succeeded, failed, stopped at its cap)."""
    tracking: TrackingSpec | None = None
    """An MLflow tracking server to log every step's metrics and the report to."""
    env: dict[str, str] = Field(default_factory=dict, max_length=256)
    """Plain environment variables for the workload on the node, e.g.
    ``{PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True}``; never a secret (the spec is stored): list
    those under secrets."""
    secrets: list[str] = Field(default_factory=list, max_length=64)
    """Names of environment variables (e.g. HF_TOKEN, WANDB_API_KEY) whose values are taken from your environment at
    launch and handed to the node through SkyPilot's secrets; their values are never stored."""

    @field_validator("env", mode="before")
    @classmethod
    def _env_values(cls, v: Any) -> Any:
        if isinstance(v, dict):  # numbers and booleans are written as YAML reads them; the node gets text
            return {k: (str(x).lower() if isinstance(x, bool) else str(x)) if isinstance(x, (bool, int, float)) else x
                    for k, x in v.items()}
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _check_env_name(name)
            if secret_looking(name):
                raise ValueError(f"{name} looks like a secret, and the spec is stored in plain text: list it under "
                                 f"secrets: [{name}] and export it where you run optjob")
            if "\x00" in value or len(value) > 8192:
                raise ValueError(f"{name}: a value must be at most 8192 characters, without NUL")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_env_name(name)
        if len(set(v)) != len(v):
            raise ValueError("a name is listed twice")
        return v

    @property
    def pipeline(self) -> list[StepBase]:
        """The step models in order (``TrainStep``, ``PruneStep``, ...), up to a ``compare`` step
        (always the last one, see ``compare``): ``pipeline[i]`` is ``steps[i]``."""
        return [entry.step for entry in self.steps if not isinstance(entry, CompareEntry)]

    @property
    def compare(self) -> CompareStep | None:
        """The spec's ``compare`` step (its last), or None."""
        last = self.steps[-1]
        return last.compare if isinstance(last, CompareEntry) else None

    @property
    def variants(self) -> dict[str, list[StepBase]]:
        """{variant name: its steps} of the ``compare`` step; empty without one."""
        compare = self.compare
        return compare.variants if compare is not None else {}

    def variant_spec(self, name: str) -> JobSpec:
        """This spec as the pipeline variant ``name`` runs: the steps before ``compare``, then the
        variant's own (so ``pipeline[len(self.pipeline) + j]`` is the variant's step j)."""
        compare = self.compare
        if compare is None or name not in compare.root:
            raise KeyError(name)
        trunk = [e for e in self.steps if not isinstance(e, CompareEntry)]
        return self.model_copy(update={"steps": [*trunk, *compare.root[name]]})

    @model_validator(mode="after")
    def _chain(self) -> JobSpec:
        check_pipeline(self)
        if self.resources.spot is not False and self.resources.cloud != "local" and not self.storage.is_remote:
            raise PathError(
                ("storage", "artifacts"),
                f"spot cloud runs need storage.artifacts: {storage_example(self.resources.cloud)}, "
                "so a relaunched attempt can resume from its checkpoints",
            )
        if both := sorted(set(self.env) & set(self.secrets)):
            raise PathError(("env", both[0]), f"{both[0]} is in env and in secrets: keep it in secrets only")
        return self


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Words that make a variable name look secret (whole ``_``-separated words: TOKENIZERS_PARALLELISM is not).
_SECRET_WORDS = {"KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASS", "CREDENTIAL", "CREDENTIALS", "AUTH",
                 "SESSION", "COOKIE", "PRIVATE", "APIKEY", "PAT", "SAS", "CONNECTION_STRING"}


def secret_looking(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (HF_TOKEN, WANDB_API_KEY, ...)."""
    upper = name.upper()
    return bool(set(upper.split("_")) & _SECRET_WORDS) or "CONNECTION_STRING" in upper or upper.endswith("APIKEY")


def _check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name):
        raise ValueError(f"{name!r} is not an environment variable name (letters, digits, _; not a digit first)")
    if name.upper().startswith(("OPTJOB_", "SKYPILOT_")):
        raise ValueError(f"{name}: OPTJOB_* and SKYPILOT_* variables are set by optjob and SkyPilot")


def _loc(i: int, kind: str, *rest: str | int) -> tuple[str | int, ...]:
    return ("steps", i, kind, *rest)


def check_pipeline(spec: JobSpec) -> None:
    """Raise ``PathError`` for the first pair of steps that cannot chain; with a ``compare`` step, the
    steps before it chained with each variant's."""
    trunk = spec.pipeline
    at = next((i for i, e in enumerate(spec.steps[:-1]) if isinstance(e, CompareEntry)), None)
    if at is not None:  # a compare step that is not the last
        after = spec.steps[at + 1]
        raise PathError(("steps", at + 1, next(iter(type(after).model_fields))),
                        f"no step may follow compare (steps[{at}]): each variant is its own pipeline, "
                        "so put this step inside the variants that need it")
    if spec.compare is None:
        _check_chain(spec, [(("steps", i), s) for i, s in enumerate(trunk)])
        return
    at = len(trunk)
    for name, entries in spec.compare.root.items():
        where: tuple[str | int, ...] = ("steps", at, "compare", name)
        if not re.match(VARIANT_NAME, name):
            raise PathError(where, f"variant name {name!r}: use lowercase letters, digits, - and _, starting "
                                   "with a letter, at most 32 characters (it names a folder and a report row)")
        for j, entry in enumerate(entries):
            if isinstance(entry, CompareEntry):
                raise PathError((*where, j, "compare"), "compare cannot be nested: list every variant in the "
                                                        "one compare step")
            if isinstance(entry.step, HpoStep):
                raise PathError((*where, j, "hpo"), "hpo cannot run inside a compare variant: search before "
                                                    "compare, so every variant starts from the tuned model")
        steps: list[tuple[tuple[str | int, ...], StepBase]] = [(("steps", i), s) for i, s in enumerate(trunk)]
        steps += [((*where, j), e.step) for j, e in enumerate(entries)]
        _check_chain(spec, steps)


def _check_chain(spec: JobSpec, located: list[tuple[tuple[str | int, ...], StepBase]]) -> None:
    arch: ModelInit | None = spec.model.init
    quantized_at: str | None = None
    for i, (prefix, step) in enumerate(located):
        if quantized_at is not None and isinstance(step, (TrainStep, DistillStep, HpoStep, PruneStep)):
            raise PathError(
                (*prefix, step.kind),
                f"{step.kind} needs gradients, but {quantized_at} quantized the model; "
                "move quantize after it",
            )
        if isinstance(step, QuantizeStep) and step.method not in ("fp16", "bf16"):
            quantized_at = _where(prefix)
        if isinstance(step, HpoStep):  # only before compare (refused in a variant): i is its index
            _check_hpo(spec, spec.pipeline, i, step)
        if isinstance(step, PruneStep) and step.method == "structured" and arch is not None:
            kept = arch.heads - round(arch.heads * step.heads_fraction)
            if kept < 1:
                raise PathError((*prefix, "prune", "heads_fraction"), "would remove every attention head")
            kv = arch.kv_heads or arch.heads
            arch = arch.model_copy(
                update={
                    "heads": kept,
                    "kv_heads": None if arch.kv_heads is None else max(1, min(kv, kept)),
                    "intermediate": arch.mlp_width - round(arch.mlp_width * step.mlp_fraction),
                }
            )
        if isinstance(step, DistillStep):
            arch = _check_student(prefix, step, arch)


def _where(prefix: tuple[str | int, ...]) -> str:
    """``steps[2]``, ``steps[3].compare.wanda[0]``: a step's place, as error lines write it."""
    out = str(prefix[0])
    for part in prefix[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _check_student(prefix: tuple[str | int, ...], step: DistillStep, teacher: ModelInit | None
                   ) -> ModelInit | None:
    s = step.student
    if teacher is None:
        return None
    for field in ("layers", "hidden", "heads", "intermediate"):
        mine = getattr(s, field)
        theirs = teacher.mlp_width if field == "intermediate" else getattr(teacher, field)
        if mine is not None and mine > theirs:
            raise PathError(
                (*prefix, "distill", "student", field),
                f"student {field} ({mine}) is larger than the teacher's ({theirs})",
            )
    if s.hidden is not None and step.init == "teacher_layers" and s.hidden != teacher.hidden:
        raise PathError(
            (*prefix, "distill", "init"),
            "init: teacher_layers copies weights, so the student must keep the teacher's hidden width; "
            "use init: random",
        )
    update: dict[str, Any] = {k: v for k, v in s.model_dump().items() if v is not None}
    if "hidden" in update and "heads" not in update and update["hidden"] % teacher.heads:
        raise PathError((*prefix, "distill", "student", "hidden"), "student hidden must be divisible by heads")
    try:
        return ModelInit.model_validate({**teacher.model_dump(), **update})
    except ValueError as exc:
        raise PathError((*prefix, "distill", "student"), f"student is not a valid model: {exc}") from None


def _check_hpo(spec: JobSpec, steps: list[StepBase], i: int, step: HpoStep) -> None:
    nxt = next((s for s in steps[i + 1 :] if not isinstance(s, EvaluateStep)), None)
    if not isinstance(nxt, (TrainStep, DistillStep)):
        raise PathError(_loc(i, "hpo"), "hpo tunes the train or distill step after it, and there is none")
    for key in step.space:
        parts = key.split(".")
        where = _loc(i, "hpo", "space", key)
        if parts[:2] == ["model", "init"] and len(parts) == 3:
            if spec.model.init is None:
                raise PathError(where, "model.init.* can only be searched when the model is built from model.init")
            if parts[2] not in HPO_ARCH_FIELDS:
                raise PathError(where, f"model.init.{parts[2]} cannot be searched; "
                                       f"use one of {', '.join(HPO_ARCH_FIELDS)}")
            _check_space_values(where, ModelInit, parts[2], step.space[key])
            continue
        if len(parts) == 3 and parts[:2] == ["train", "adapter"]:
            if not isinstance(nxt, TrainStep) or nxt.adapter is None:
                raise PathError(where, "train.adapter.* can only be searched when the train step after hpo "
                                       "has an adapter")
            if parts[2] not in ADAPTER_SEARCH_FIELDS:
                raise PathError(where, f"train.adapter.{parts[2]} cannot be searched; "
                                       f"use one of {', '.join(ADAPTER_SEARCH_FIELDS)}")
            _check_space_values(where, AdapterSpec, parts[2], step.space[key])
            continue
        if len(parts) == 2 and parts[0] in ("train", "distill"):
            if parts[0] != nxt.kind:
                raise PathError(where, f"the step after hpo is {nxt.kind}, not {parts[0]}")
            fields = STEP_TYPES[parts[0]].model_fields
            if parts[1] not in fields or parts[1] in ("early_stopping", "student", "betas", "adapter"):
                raise PathError(where, f"{parts[0]} has no searchable field {parts[1]!r}")
            _check_space_values(where, STEP_TYPES[parts[0]], parts[1], step.space[key])
            continue
        raise PathError(where, f"{key!r} names no field; use train.FIELD, train.adapter.FIELD, distill.FIELD "
                               "or model.init.FIELD")


@functools.cache
def _field_adapter(owner: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """A validator for one field of ``owner``: its type with its bounds."""
    info = owner.model_fields[name]
    annotation: Any = info.annotation
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return TypeAdapter(annotation)


def _check_space_values(where: tuple[str | int, ...], owner: type[BaseModel], name: str, dist: Distribution) -> None:
    """Every value a search dimension can produce must be valid for the field it sets, so a search
    over ``train.batch_size: {int: [1, 10000000]}`` fails here, not in a trial after money is spent.
    Field-level only (its type and bounds); checks across fields happen when a trial's options are built."""
    adapter = _field_adapter(owner, name)
    key = next(k for k in ("log_uniform", "uniform", "int", "choice") if getattr(dist, k) is not None)
    values: list[Any] = list(getattr(dist, key))
    if key in ("log_uniform", "uniform") and _is_int_field(owner, name):
        raise PathError((*where, key), f"{name} is an integer: search it with int: [low, high] or choice: [...]")
    for n, value in enumerate(values):
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            why = exc.errors()[0]["msg"] if exc.errors() else str(exc)
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise PathError((*where, key, n), f"{shown} is not a valid {name}: {why}") from None


def _is_int_field(owner: type[BaseModel], name: str) -> bool:
    annotation = owner.model_fields[name].annotation
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return annotation is int or (int in args and float not in args)
