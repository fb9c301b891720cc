"""hpo: a small random search completes and its best params apply to the spec; a
stopped search resumes; a trial killed mid-run (stale heartbeat) is retried; grid over
an architecture field returns the rebuilt model; a distill step can be tuned."""

from __future__ import annotations

import io
import sqlite3
import warnings
from typing import Any

import optuna
import pytest
import torch
from optjob.specs import HpoStep, JobSpec
from optjob.specs.errors import StepError
from optjob.specs.model import ModelInit
from optjob.steps import hpo
from optjob.steps.context import StepContext, StopFlag, StopRequested
from optjob.steps.data import Corpus
from optjob.steps.events import Emitter
from optjob.steps.modeling import build_model
from optuna.trial import TrialState

INIT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 512}
CPU = torch.device("cpu")
LR = {"log_uniform": [1e-4, 1e-2]}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    return Corpus(torch.randint(0, 64, (3000,), generator=g), seq_len=32, eval_fraction=0.1)


class Recorder(Emitter):
    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, /, **fields: Any) -> dict[str, Any]:
        self.events.append((event, fields))
        return super().emit(event, **fields)


def make_spec(hpo_body: dict, after: dict | None = None) -> JobSpec:
    after = after or {"train": {"max_steps": 100, "batch_size": 4, "warmup_steps": 10}}
    return JobSpec.model_validate(
        {"name": "search", "model": {"init": INIT}, "steps": [{"hpo": hpo_body}, after]}
    )


def make_ctx(tmp_path, spec: JobSpec, corpus: Corpus) -> StepContext:
    return StepContext(
        spec=spec, job_dir=tmp_path, index=0, emitter=Recorder(), device=CPU, dry_run=False,
        corpus=corpus, tokenizer=None, stop=StopFlag(),
    )


def tiny() -> torch.nn.Module:
    return build_model(ModelInit(**INIT), 512, seed=0)


def search(trials: int, **extra: Any) -> dict:
    return {"trials": trials, "sampler": "random", "trial_steps": 3, "pruner": "none",
            "space": {"train.lr": LR}, **extra}


def test_preflight_refuses_continuous_grid():
    step = HpoStep(sampler="grid", space={"train.lr": LR, "train.batch_size": {"int": [2, 4]}})
    with pytest.raises(StepError, match=r"train\.lr"):
        hpo.preflight(step, CPU)
    hpo.preflight(HpoStep(sampler="grid", space={"train.lr": {"choice": [1e-3]}}), CPU)


def test_apply_overrides():
    spec = make_spec({"space": {"train.lr": LR, "model.init.layers": {"int": [1, 3]}}})
    new = hpo.apply_overrides(spec, 0, {"train": {"lr": 0.01}, "model.init": {"layers": 3}})
    assert new.pipeline[1].lr == 0.01 and new.model.init.layers == 3
    assert new.pipeline[1].max_steps == 100
    assert spec.pipeline[1].lr == 3e-4 and spec.model.init.layers == 2  # unchanged
    assert hpo.apply_overrides(spec, 0, {"train": {}, "model.init": {}}) == spec
    with pytest.raises(StepError, match="invalid spec"):
        hpo.apply_overrides(spec, 0, {"train": {"warmup_steps": 1000}})
    with pytest.raises(StepError, match="distill"):
        hpo.apply_overrides(spec, 0, {"distill": {"alpha": 0.1}})


def test_random_search_then_resume(tmp_path, corpus):
    spec = make_spec(search(2))
    ctx = make_ctx(tmp_path, spec, corpus)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = hpo.run(ctx, ctx.step, model)
    assert out.model is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [t["state"] for t in out.extra["trials"]] == ["complete", "complete"]
    assert len([e for e, _ in ctx.emitter.events if e == "trial"]) == 2
    assert (tmp_path / "steps" / "00-hpo" / "study.db").exists()
    # Ask for 3: only one more trial runs.
    spec3 = make_spec(search(3))
    ctx3 = make_ctx(tmp_path, spec3, corpus)
    out3 = hpo.run(ctx3, ctx3.step, tiny())
    assert [t["number"] for t in out3.extra["trials"]] == [0, 1, 2]
    assert len([e for e, _ in ctx3.emitter.events if e == "trial"]) == 1
    best = out3.extra["best_params"]
    assert set(best) == {"train.lr"}
    assert min(t["value"] for t in out3.extra["trials"]) == out3.metrics["best_value"]
    assert out3.extra["overrides"] == {"train": {"lr": best["train.lr"]}, "model.init": {}}
    tuned = hpo.apply_overrides(spec3, 0, out3.extra["overrides"])
    assert tuned.pipeline[1].lr == best["train.lr"]


@pytest.mark.parametrize("heartbeat", [True, False], ids=["stale-heartbeat", "no-heartbeat"])
def test_killed_running_trial_is_retried(tmp_path, corpus, heartbeat):
    spec = make_spec(search(1))
    ctx = make_ctx(tmp_path, spec, corpus)
    db = ctx.step_dir() / "study.db"
    ctx.step_dir().mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}", heartbeat_interval=10)
        study = optuna.create_study(storage=storage, study_name="search")
        trial = study.ask()
        lr = trial.suggest_float("train.lr", 1e-4, 1e-2, log=True)
        if heartbeat:
            storage.record_heartbeat(trial._trial_id)
        storage.remove_session()
        storage.engine.dispose()
    with sqlite3.connect(db) as con:  # the attempt died an hour ago
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    out = hpo.run(ctx, ctx.step, tiny())
    states = [(t["number"], t["state"]) for t in out.extra["trials"]]
    assert states == [(0, "fail"), (1, "complete")]
    assert out.extra["trials"][1]["params"] == {"train.lr": lr}
    assert out.metrics["trials_complete"] == 1 and out.metrics["trials_failed"] == 1
    loaded = optuna.load_study(study_name="search", storage=f"sqlite:///{db}")
    assert loaded.trials[1].system_attrs["failed_trial"] == 0
    assert loaded.trials[0].state == TrialState.FAIL


def test_grid_over_architecture_rebuilds_the_model(tmp_path, corpus):
    body = {"trials": 10, "sampler": "grid", "trial_steps": 4, "pruner": "median",
            "space": {"model.init.layers": {"choice": [1, 2]}, "train.lr": {"choice": [3e-3]}}}
    ctx = make_ctx(tmp_path, make_spec(body), corpus)
    out = hpo.run(ctx, ctx.step, tiny())
    assert len(out.extra["trials"]) == 2  # the grid has two points
    assert sorted(t["params"]["model.init.layers"] for t in out.extra["trials"]) == [1, 2]
    layers = out.extra["overrides"]["model.init"]["layers"]
    assert out.model.config.num_hidden_layers == layers
    assert out.extra["overrides"]["train"] == {"lr": 3e-3}


def test_tunes_a_distill_step(tmp_path, corpus):
    after = {"distill": {"student": {"layers": 1}, "max_steps": 50, "batch_size": 4}}
    body = {"trials": 1, "sampler": "tpe", "trial_steps": 2, "pruner": "none",
            "space": {"distill.alpha": {"uniform": [0.2, 0.8]}}}
    ctx = make_ctx(tmp_path, make_spec(body, after), corpus)
    out = hpo.run(ctx, ctx.step, tiny())
    alpha = out.extra["overrides"]["distill"]["alpha"]
    assert 0.2 <= alpha <= 0.8
    assert out.extra["trials"][0]["eval_loss"] > 0


def test_stop_requeues_the_interrupted_trial(tmp_path, corpus):
    spec = make_spec(search(2))
    ctx = make_ctx(tmp_path, spec, corpus)
    ctx.stop.request()
    with pytest.raises(StopRequested):
        hpo.run(ctx, ctx.step, tiny())
    again = make_ctx(tmp_path, spec, corpus)
    out = hpo.run(again, again.step, tiny())
    states = [t["state"] for t in out.extra["trials"]]
    assert states == ["fail", "complete", "complete"]


def test_median_pruner_stops_a_bad_trial(tmp_path, corpus):
    body = {"trials": 3, "sampler": "random", "trial_steps": 8, "pruner": "median",
            "space": {"train.lr": {"choice": [3e-3, 1e-7]}}}
    ctx = make_ctx(tmp_path, make_spec(body), corpus)
    ctx.step_dir().mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{ctx.step_dir() / 'study.db'}",
                                study_name="search")
    for lr in (3e-3, 3e-3, 1e-7):  # two good trials first, then a hopeless one
        study.enqueue_trial({"train.lr": lr})
    out = hpo.run(ctx, ctx.step, tiny())
    assert [t["state"] for t in out.extra["trials"]] == ["complete", "complete", "pruned"]
    assert out.metrics["trials_pruned"] == 1


def test_a_search_resumes_on_a_fresh_node_from_storage(tmp_path, corpus):
    from optjob.steps.storage import LocalStorage
    from optjob.steps.sync import Sync

    storage = LocalStorage(tmp_path / "bucket")  # the S3 code path is tests/steps/test_sync.py's
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    sync = Sync(storage, node_a)
    sync.start()  # as the runner does: registers the upload hooks
    try:
        ctx = make_ctx(node_a, make_spec(search(2)), corpus)
        hpo.run(ctx, ctx.step, tiny())
    finally:
        sync.close()
    assert "steps/00-hpo/study.db" in storage.list_keys()  # uploaded after the trials
    got = Sync(storage, node_b).pull()  # a fresh node: nothing but the bucket
    assert got["state"] == ["00-hpo/study.db"]
    ctx_b = make_ctx(node_b, make_spec(search(3)), corpus)
    out = hpo.run(ctx_b, ctx_b.step, tiny())
    assert [t["number"] for t in out.extra["trials"]] == [0, 1, 2]  # two came from node a
    assert len([e for e, _ in ctx_b.emitter.events if e == "trial"]) == 1
