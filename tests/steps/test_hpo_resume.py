"""Issue 13, item 4: an interrupted search resumes to exactly the search a straight run makes.

The same search (seed 11) runs straight, and again interrupted after trial k — a stop request
between trials, or a kill in the middle of a trial (the trial is left RUNNING in the study, as a
SIGKILL leaves it) — then rerun in a fresh context, as the next attempt would. The finished trials
must draw the same parameters in the same order and reach the same best value. After every trial
the step emits ``progress`` (what a preemption rehearsal counts to pick its kill point)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from optjob.specs import JobSpec
from optjob.specs.model import ModelInit
from optjob.steps import hpo
from optjob.steps.context import StepContext, StopFlag, StopRequested
from optjob.steps.data import Corpus
from optjob.steps.events import Emitter
from optjob.steps.modeling import build_model

INIT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 512}
CPU = torch.device("cpu")
SPACE = {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "train.weight_decay": {"uniform": [0.0, 0.1]}}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    return Corpus(torch.randint(0, 64, (3000,), generator=g), seq_len=32, eval_fraction=0.1)


class Recorder(Emitter):
    """Keeps the events; ``stop_after`` trial events, asks the step to stop (as SIGTERM would)."""

    def __init__(self, stop: StopFlag, stop_after: int | None = None) -> None:
        super().__init__(io.StringIO())
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stop, self.stop_after = stop, stop_after

    def emit(self, event: str, /, **fields: Any) -> dict[str, Any]:
        self.events.append((event, fields))
        if event == "trial" and self.stop_after is not None and self.count("trial") == self.stop_after:
            self.stop.request()
        return super().emit(event, **fields)  # strict JSON, as on the node

    def count(self, kind: str) -> int:
        return sum(e == kind for e, _ in self.events)


def spec(sampler: str, trials: int) -> JobSpec:
    body = {"trials": trials, "sampler": sampler, "seed": 11, "trial_steps": 2, "pruner": "none", "space": SPACE}
    if sampler == "grid":
        body["space"] = {"train.lr": {"choice": [1e-3, 3e-3, 1e-2]}, "train.weight_decay": {"choice": [0.0, 0.1]}}
    after = {"train": {"max_steps": 100, "batch_size": 4, "warmup_steps": 10}}
    return JobSpec.model_validate({"name": "search", "model": {"init": INIT}, "steps": [{"hpo": body}, after]})


def context(tmp_path: Any, job: JobSpec, corpus: Corpus, stop_after: int | None = None) -> StepContext:
    stop = StopFlag()
    return StepContext(spec=job, job_dir=tmp_path, index=0, emitter=Recorder(stop, stop_after), device=CPU,
                       dry_run=False, corpus=corpus, tokenizer=None, stop=stop)


def tiny() -> torch.nn.Module:
    return build_model(ModelInit(**INIT), 512, seed=0)


def finished(out: hpo.StepOutcome) -> list[tuple[dict[str, Any], float | None]]:
    """(params, value) of the completed trials, in the order they ran (retries replace their trial)."""
    return [(t["params"], t["value"]) for t in out.extra["trials"] if t["state"] == "complete"]


class Killed(BaseException):
    """The process dying mid-trial: nothing below it runs, the trial stays RUNNING in the study."""


CASES = [("random", 6, 2), ("tpe", 12, 10), ("grid", 5, 2)]  # sampler, trials, interrupted after this many
#: TPE models the finished trials from its 11th trial on: k = 10 resumes into that.


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> dict[str, hpo.StepOutcome]:
    """Each sampler's search run straight, once for the module."""
    out = {}
    for sampler, trials, _ in CASES:
        ctx = context(tmp_path_factory.mktemp(f"straight-{sampler}"), spec(sampler, trials), corpus)
        out[sampler] = hpo.run(ctx, ctx.step, tiny())
        assert len(finished(out[sampler])) == trials
    return out


@pytest.mark.parametrize("sampler, trials, k", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_an_interrupted_search_resumes_to_the_straight_search(
    tmp_path, corpus, monkeypatch: pytest.MonkeyPatch, straight_runs: dict[str, hpo.StepOutcome],
    sampler: str, trials: int, k: int, how: str,
):
    job = spec(sampler, trials)
    straight = straight_runs[sampler]

    first = context(tmp_path / "interrupted", job, corpus, stop_after=k if how == "stop" else None)
    if how == "stop":
        with pytest.raises(StopRequested):
            hpo.run(first, first.step, tiny())
    else:
        fresh_model = hpo.Objective.fresh_model
        calls = []

        def dies_in_trial_k(self: hpo.Objective, arch: dict[str, Any], seed: int) -> torch.nn.Module:
            calls.append(1)
            if len(calls) == k + 1:  # the parameters of trial k are drawn and stored: now the node dies
                raise Killed
            return fresh_model(self, arch, seed)

        monkeypatch.setattr(hpo.Objective, "fresh_model", dies_in_trial_k)
        with pytest.raises(Killed):
            hpo.run(first, first.step, tiny())
        monkeypatch.setattr(hpo.Objective, "fresh_model", fresh_model)
    assert first.emitter.count("trial") == k  # type: ignore[attr-defined]

    again = context(tmp_path / "interrupted", job, corpus)  # the next attempt: a new process
    resumed = hpo.run(again, again.step, tiny())
    assert [t["state"] for t in resumed.extra["trials"]].count("fail") == 1  # the interrupted trial
    assert finished(resumed) == finished(straight)
    assert resumed.extra["best_params"] == straight.extra["best_params"]
    assert resumed.metrics["best_value"] == straight.metrics["best_value"]


def test_every_trial_reports_progress(tmp_path, corpus):
    ctx = context(tmp_path, spec("random", 3), corpus)
    hpo.run(ctx, ctx.step, tiny())
    events: list[tuple[str, dict[str, Any]]] = ctx.emitter.events  # type: ignore[attr-defined]
    progress = [f for e, f in events if e == "progress"]
    assert [(p["index"], p["kind"], p["step"], p["max_steps"]) for p in progress] == \
        [(0, "hpo", n, 3) for n in (1, 2, 3)]
    assert all(isinstance(p["loss"], float) and isinstance(p["best"], float) for p in progress)
    assert progress[-1]["best"] == min(p["loss"] for p in progress)  # eval_loss is the metric here
    # Each trial: its result, the study saved (what a rehearsal counts lost work from), then progress.
    kinds = [e for e, _ in events]
    assert kinds == ["trial", "checkpoint", "progress"] * 3
    assert [f["step"] for e, f in events if e == "checkpoint"] == [1, 2, 3]


def test_trial_seeds_are_numpy_seeds_and_differ_by_seed_and_slot():
    seeds = {hpo.trial_seed(seed, slot) for seed in (0, 1, 11, 2**32 - 1) for slot in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)
