"""``hpo``: an Optuna search over the next train/distill step's fields and model.init.

The study lives in ``STEP_DIR/study.db`` (SQLite, named after the job), so a stopped
search resumes: trials COMPLETE or PRUNED count toward ``trials``; with artifact storage the
study is uploaded after every trial and pulled on a fresh node (``steps.sync``). Trials record a
heartbeat; on start, a trial left RUNNING by a killed attempt is failed and re-queued
with the same parameters (``RetryHeartbeatStaleTrialCallback``, optuna 5's name for
``RetryFailedTrialCallback``). A trial interrupted by a stop request is re-queued too.

A resumed search samples exactly what an uninterrupted one would. A trial's slot is its place in
the search (a retry takes the slot of the trial it retries, ``slot_of``); random and TPE draw each
trial's parameters with a fresh sampler seeded from ``(seed, slot)`` (``TrialSeededSampler``), so
random is a function of the seed alone and TPE of the seed and the finished trials; grid gives slot
``n`` the ``n``-th point of an order fixed by the seed (``GridBySlot``).

After each trial the step emits ``trial``, ``checkpoint`` (the study is saved) and ``progress``
(``step`` = trials finished of ``max_steps`` = trials), so the manager shows the search advancing
and a preemption rehearsal (which counts progress events) can kill it between trials.

Each trial trains a copy of the incoming model (or, when ``model.init.*`` keys are
searched, a model rebuilt from the changed init) for ``trial_steps`` with no
checkpoints and no events, then scores it on the eval split. The step returns the
incoming model unchanged (or, when the best trial changed model.init, that model
rebuilt as the runner would build it) and ``extra["overrides"]``, which the runner
applies to the spec with ``apply_overrides`` before the next step runs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optjob.specs import DistillStep, HpoStep, JobSpec, StepBase, TrainOptions
from optjob.specs.errors import StepError
from optjob.specs.model import ModelInit
from optjob.specs.steps import Distribution, EvaluateStep
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError
from torch import nn

from . import checkpoint
from .context import StepContext, StepOutcome, StopRequested

ARCH = "model.init"
#: The study's file in the step folder; ``steps.sync`` mirrors it after every trial.
STUDY_FILE = "study.db"
HEARTBEAT_S = 10
GRACE_S = 30
MAX_RETRY = 3
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def preflight(step: HpoStep, device: Any) -> None:
    if step.sampler == "grid":
        continuous = [k for k, d in step.space.items() if d.choice is None and d.int is None]
        if continuous:
            raise StepError(
                f"the grid sampler needs discrete dimensions; {', '.join(continuous)} "
                "are continuous",
                hint="give them as choice: [...] or use sampler: tpe/random",
            )


# --------------------------------------------------------------------------- overrides


def split_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.lr": 1e-3, "model.init.layers": 2}`` -> ``{"train": {"lr": 1e-3},
    "model.init": {"layers": 2}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        if key.startswith(ARCH + "."):
            out.setdefault(ARCH, {})[key[len(ARCH) + 1 :]] = value
        else:
            section, _, name = key.partition(".")
            out.setdefault(section, {})[name] = value
    return out


def set_fields(options: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``options`` (a step's dumped options) with ``fields`` set; a dotted name sets a nested
    field (``adapter.r``)."""
    out = copy.deepcopy(options)
    for name, value in fields.items():
        *outer, last = name.split(".")
        target = out
        for part in outer:
            if not isinstance(target.get(part), dict):
                raise StepError(f"hpo parameter {name!r}: the step has no {part!r} options to set it in")
            target = target[part]
        target[last] = value
    return out


def tuned_index(pipeline: list[StepBase], hpo_index: int) -> int:
    """Index of the train/distill step the hpo step at ``hpo_index`` tunes."""
    for j in range(hpo_index + 1, len(pipeline)):
        if not isinstance(pipeline[j], EvaluateStep):
            if pipeline[j].kind in ("train", "distill"):
                return j
            break
    raise StepError("hpo tunes the train or distill step after it, and there is none")


def apply_overrides(
    spec: JobSpec, hpo_index: int, overrides: dict[str, dict[str, Any]]
) -> JobSpec:
    """A new spec with the tuned step's fields and ``model.init`` fields replaced."""
    data = spec.model_dump()
    j = tuned_index(spec.pipeline, hpo_index)
    kind = spec.pipeline[j].kind
    for section, fields in overrides.items():
        if not fields:
            continue
        if section == ARCH:
            if data["model"].get("init") is None:
                raise StepError("model.init overrides need a model built from model.init")
            data["model"]["init"].update(fields)
        elif section == kind:
            data["steps"][j][kind] = set_fields(data["steps"][j][kind], fields)
        else:
            raise StepError(f"hpo override for {section!r}, but steps[{j}] is {kind}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise StepError(f"the best hpo parameters make an invalid spec: {exc}") from None


# --------------------------------------------------------------------------- the study


def grid_space(space: dict[str, Distribution]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for key, d in space.items():
        if d.choice is not None:
            out[key] = list(d.choice)
        elif d.int is not None:
            out[key] = list(range(d.int[0], d.int[1] + 1))
        else:
            raise StepError(f"the grid sampler cannot search the continuous {key}")
    return out


def make_sampler(step: HpoStep) -> optuna.samplers.BaseSampler:
    """The study's sampler: every trial's parameters a function of the seed, the trial's slot
    (``slot_of``) and, for TPE, the finished trials, so an interrupted search resumes exactly."""
    if step.sampler == "grid":
        return GridBySlot(grid_space(step.space), step.seed)
    if step.sampler == "random":
        return TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), step.seed)
    return TrialSeededSampler(lambda seed: optuna.samplers.TPESampler(seed=seed), step.seed)


def trial_seed(seed: int, slot: int) -> int:
    """The seed of the sampler that draws slot ``slot``'s parameters: a hash of ``(seed, slot)``
    (so seeds 11 and 12 do not give the same trials shifted by one), below 2**32 as numpy needs."""
    return int.from_bytes(hashlib.sha256(f"optjob-hpo:{seed}:{slot}".encode()).digest()[:4], "big")


def slot_of(study: optuna.Study, trial: FrozenTrial) -> int:
    """The trial's place in the search, the same however often the search was interrupted: a retry
    (a trial re-queued after a kill or a stop) takes the place of the trial it retries; any other
    trial the next place, counting the trials before it that are not retries."""
    origin = trial.system_attrs.get("failed_trial", trial.number)
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < origin and "failed_trial" not in t.system_attrs)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Each trial sampled by a fresh sampler from ``make(trial_seed(seed, slot_of(trial)))``.

    A sampler seeded once draws from one random stream across trials, so a search resumed in a new
    process (or one that re-queued a killed trial) would draw other parameters than a straight run;
    seeding per slot makes a trial's parameters a function of the seed, its slot and the finished
    trials only."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._current: tuple[int, optuna.samplers.BaseSampler] | None = None

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if self._current is None or self._current[0] != trial.number:
            self._current = (trial.number, self._make(trial_seed(self._seed, slot_of(study, trial))))
        return self._current[1]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._current = None  # a trial number may come round again (a test's fresh study)
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        self._current = None

    def reseed_rng(self) -> None:
        pass  # every trial's sampler is seeded from (seed, slot): nothing to reseed


class GridBySlot(optuna.samplers.BaseSampler):
    """Grid search: the grid's points in an order fixed by the seed, slot ``n`` taking point ``n``
    (past the end, the order again: only failed trials get there). Optuna's GridSampler numbers its
    points by trial number, which a re-queued trial shifts, and picks among the rest at random."""

    def __init__(self, space: dict[str, list[Any]], seed: int) -> None:
        self._names = list(space)
        points = list(itertools.product(*space.values()))
        order = sorted(range(len(points)),
                       key=lambda i: hashlib.sha256(f"optjob-grid:{seed}:{i}".encode()).digest())
        self._points = [points[i] for i in order]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        point = self._points[slot_of(study, trial) % len(self._points)]
        return point[self._names.index(param_name)]


def suggest(trial: optuna.Trial, key: str, d: Distribution) -> Any:
    if d.log_uniform is not None:
        return trial.suggest_float(key, *d.log_uniform, log=True)
    if d.uniform is not None:
        return trial.suggest_float(key, *d.uniform)
    if d.int is not None:
        return trial.suggest_int(key, *d.int)
    return trial.suggest_categorical(key, d.choice)  # type: ignore[arg-type]


def open_study(step: HpoStep, ctx: StepContext) -> optuna.Study:
    """Create or load the study; fail and re-queue trials a killed attempt left RUNNING."""
    ctx.step_dir().mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        storage = RDBStorage(
            url=f"sqlite:///{ctx.step_dir() / STUDY_FILE}",
            engine_kwargs={"connect_args": {"timeout": 60}},
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=retry,
        )
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()  # None means median
        if step.pruner == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=2)
        study = optuna.create_study(storage=storage, study_name=ctx.spec.name, pruner=pruner,
                                    direction=step.direction, load_if_exists=True)
        optuna.storages.fail_stale_trials(study)
        # One process drives a job's study, so anything still RUNNING is an orphan.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            retry(study, study.get_trials(deepcopy=False)[t.number])
    study.sampler = make_sampler(step)
    return study


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    value = t.value if t.value is not None and math.isfinite(t.value) else None
    return {"number": t.number, "params": dict(t.params), "value": value,
            "state": t.state.name.lower(), **t.user_attrs}


def progress_fields(study: optuna.Study, t: FrozenTrial, counted: int, target: int) -> dict[str, Any]:
    """A ``progress`` event after a trial: ``step`` trials finished (complete or pruned) of
    ``max_steps`` = ``trials``; ``loss`` the trial's eval loss and ``best`` the best value so far,
    where there are such numbers (a display formats them)."""
    fields: dict[str, Any] = {"step": counted, "max_steps": target, "trial": t.number,
                              "state": t.state.name.lower()}
    loss = t.user_attrs.get("eval_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        fields["loss"] = loss
    complete = [x.value for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if x.value is not None and math.isfinite(x.value)]
    if complete:
        fields["best"] = min(complete) if study.direction == optuna.study.StudyDirection.MINIMIZE else max(complete)
    return fields


def trial_options(
    base: TrainOptions, fields: dict[str, Any], trial_steps: int, pruner: bool
) -> TrainOptions:
    """The tuned step's options with ``fields`` applied, cut to ``trial_steps``."""
    data = set_fields(base.model_dump(), fields)
    full = max(1, int(data["max_steps"]))
    data["max_steps"] = trial_steps
    data["warmup_steps"] = min(trial_steps, round(int(data["warmup_steps"]) * trial_steps / full))
    data["eval_every"] = max(1, trial_steps // 4) if pruner else None
    data["early_stopping"] = None
    data["log_every"] = min(int(data["log_every"]), trial_steps)
    try:
        return type(base).model_validate(data)
    except ValidationError as exc:
        raise StepError(f"hpo trial options are invalid: {exc}") from None


def changed_init(spec: JobSpec, arch: dict[str, Any]) -> ModelInit:
    if spec.model.init is None:
        raise StepError("model.init.* can only be searched for a model built from model.init")
    try:
        return ModelInit.model_validate({**spec.model.init.model_dump(), **arch})
    except ValidationError as exc:
        raise StepError(f"invalid architecture {arch}: {exc}") from None


def build_arch(ctx: StepContext, model: nn.Module, init: ModelInit, seed: int) -> nn.Module:
    """A fresh model of ``init``, built as the runner builds a job's first model
    (vocabulary and special tokens from the tokenizer, else from ``model``'s config)."""
    from .modeling import build_model

    config: Any = model.config
    source = ctx.tokenizer if ctx.tokenizer is not None else config
    vocab = len(ctx.tokenizer) if ctx.tokenizer is not None else int(config.vocab_size)
    special = {k: getattr(source, k, None) for k in SPECIAL_TOKENS}
    built: nn.Module = build_model(init, vocab, seed, **special)
    return built.to(ctx.device)


def first_seed(spec: JobSpec) -> int:
    """The seed the runner builds a model.init model with."""
    return next((getattr(s, "seed", 0) for s in spec.pipeline if s.kind in ("train", "distill")), 0)


class Objective:
    """One trial: build or copy the model, train it briefly, score it."""

    def __init__(self, ctx: StepContext, step: HpoStep, model: nn.Module) -> None:
        self.ctx, self.step, self.model = ctx, step, model
        pipeline = ctx.spec.pipeline
        self.tuned = pipeline[tuned_index(pipeline, ctx.index)]
        assert isinstance(self.tuned, TrainOptions)

    def fresh_model(self, arch: dict[str, Any], seed: int) -> nn.Module:
        if not arch:
            return copy.deepcopy(self.model)
        try:
            init = changed_init(self.ctx.spec, arch)
        except StepError as exc:
            raise optuna.TrialPruned(str(exc)) from None
        return build_arch(self.ctx, self.model, init, seed)

    def __call__(self, trial: optuna.Trial) -> float:
        from .distill import distill_train
        from .evaluate import perplexity
        from .train import corpus_eval_loss, train_loop

        ctx, step = self.ctx, self.step
        ctx.stop.check()
        params = {key: suggest(trial, key, d) for key, d in step.space.items()}
        parts = split_params(params)
        opts = trial_options(self.tuned, parts.get(self.tuned.kind, {}), step.trial_steps,
                             step.pruner == "median")
        model = self.fresh_model(parts.get(ARCH, {}), opts.seed)
        sign = 1.0 if step.direction == "minimize" else -1.0

        def report(at: int, loss: float) -> None:
            trial.report(sign * loss, at)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {at} (eval loss {loss:.4f})")

        kwargs: dict[str, Any] = {"checkpoints": False, "emit": False, "report": report}
        try:
            if isinstance(opts, DistillStep):
                model, _ = distill_train(ctx, model, opts, **kwargs)
            else:
                model = train_loop(ctx, model, opts, **kwargs).model
        except StepError as exc:  # a diverged trial is a bad trial, not a failed search
            if "diverged" not in str(exc):
                raise
            trial.set_user_attr("error", str(exc))
            return sign * math.inf
        loss, acc = corpus_eval_loss(model, ctx.corpus, opts.batch_size, opts.eval_batches, ctx.device)
        trial.set_user_attr("eval_loss", loss)
        trial.set_user_attr("accuracy", acc)
        value = {"eval_loss": loss, "perplexity": perplexity(loss), "accuracy": acc}[step.metric]
        return value if math.isfinite(value) else sign * math.inf


def run(ctx: StepContext, step: HpoStep, model: nn.Module) -> StepOutcome:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = Objective(ctx, step, model)
    study = open_study(step, ctx)
    target = step.trials
    if step.sampler == "grid":
        target = min(target, math.prod(len(v) for v in grid_space(step.space).values()))
    done = len(study.get_trials(deepcopy=False, states=COUNTED))

    def on_trial(study: optuna.Study, t: FrozenTrial) -> None:
        rec = trial_record(t)
        ctx.emit("trial", number=rec["number"], params=rec["params"], value=rec["value"],
                 state=rec["state"])
        study_file = ctx.step_dir() / STUDY_FILE
        checkpoint.state_changed(study_file)
        # The study is on disk with this trial: a kill from now on loses only the next trial.
        counted = len(study.get_trials(deepcopy=False, states=COUNTED))
        ctx.emit("checkpoint", step=counted, path=str(study_file))
        ctx.emit("progress", **progress_fields(study, t, counted, target))

    if done < target:
        try:
            study.optimize(objective, n_trials=target - done, callbacks=[on_trial])
        except StopRequested:  # re-queue the interrupted trial for the resumed search
            last = study.trials[-1]
            if last.state == TrialState.FAIL:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    RetryHeartbeatStaleTrialCallback()(study, last)
            raise
    finished = [t for t in study.trials if t.state.is_finished()]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if not complete:
        raise StepError(f"no hpo trial completed ({len(finished)} finished)")
    best = study.best_trial
    overrides = split_params(best.params)
    overrides.setdefault(objective.tuned.kind, {})
    overrides.setdefault(ARCH, {})
    metrics: dict[str, Any] = {
        "metric": step.metric,
        "best_value": best.value,
        "best_trial": best.number,
        "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in finished),
        "trials_failed": sum(t.state == TrialState.FAIL for t in finished),
        **{f"best.{k}": v for k, v in best.params.items()},
    }
    extra = {
        "best_params": dict(best.params),
        "overrides": overrides,
        "trials": [trial_record(t) for t in finished],
    }
    if overrides[ARCH]:  # the next step starts from the best architecture
        tuned = apply_overrides(ctx.spec, ctx.index, overrides)
        assert tuned.model.init is not None
        model = build_arch(ctx, model, tuned.model.init, first_seed(tuned))
    return StepOutcome(model=model, metrics=metrics, extra=extra)
