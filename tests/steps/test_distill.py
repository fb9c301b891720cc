"""distill: layer choice and copying, student shapes, the loss falls, a stopped run
resumes to the same weights, and distilling beats training the student from scratch."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from optjob.specs import DistillStep, JobSpec, TrainStep
from optjob.specs.errors import StepError
from optjob.specs.model import ModelInit
from optjob.steps import distill
from optjob.steps.context import StepContext, StopFlag, StopRequested
from optjob.steps.data import Corpus
from optjob.steps.evaluate import eval_loss
from optjob.steps.events import Emitter
from optjob.steps.modeling import build_model
from optjob.steps.train import train_loop

TEACHER = {"layers": 4, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 512}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """A learnable stream: each token has two possible successors among 64."""
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 64, (64, 2), generator=g)
    pick = torch.randint(0, 2, (8000,), generator=g).tolist()
    ids = [0]
    for p in pick[1:]:
        ids.append(int(table[ids[-1], p]))
    return Corpus(torch.tensor(ids), seq_len=32, eval_fraction=0.1)


class StopAt(Emitter):
    """Records events; requests a stop when a progress event reaches ``at``."""

    def __init__(self, stop: StopFlag, at: int | None = None) -> None:
        super().__init__(io.StringIO())
        self.stop, self.at, self.events = stop, at, []

    def emit(self, event: str, /, **fields: Any) -> dict[str, Any]:
        self.events.append((event, fields))
        if event == "progress" and fields.get("step") == self.at:
            self.stop.request()
        return super().emit(event, **fields)


def make_ctx(tmp_path, step: dict, corpus: Corpus, stop_at: int | None = None) -> StepContext:
    spec = JobSpec.model_validate({"name": "t", "model": {"init": TEACHER}, "steps": [step]})
    stop = StopFlag()
    return StepContext(
        spec=spec, job_dir=tmp_path, index=0, emitter=StopAt(stop, stop_at), device=CPU,
        dry_run=False, corpus=corpus, tokenizer=None, stop=stop,
    )


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory) -> torch.nn.Module:
    """The 4-layer teacher, trained for a few dozen steps."""
    model = build_model(ModelInit(**TEACHER), 512, seed=0)
    ctx = make_ctx(tmp_path_factory.mktemp("teacher"), {"train": {}}, corpus)
    opts = TrainStep(max_steps=40, lr=3e-3, batch_size=8, warmup_steps=0, schedule="constant")
    return train_loop(ctx, model, opts, checkpoints=False, emit=False).model.eval()


def loss_of(model: torch.nn.Module, corpus: Corpus) -> float:
    return eval_loss(model, corpus, 8, 4, CPU)[0]


def test_pick_layers():
    assert distill.pick_layers(4, 2) == [0, 2]
    assert distill.pick_layers(6, 3) == [0, 2, 4]
    assert distill.pick_layers(4, 3) == [0, 1, 2]
    assert distill.pick_layers(4, 4) == [0, 1, 2, 3]
    assert distill.pick_layers(5, 1) == [0]
    with pytest.raises(StepError):
        distill.pick_layers(2, 3)


def test_teacher_layers_copies_the_right_layers(teacher):
    step = DistillStep(student={"layers": 2})
    student = distill.build_student(teacher, step, CPU)
    assert student.config.num_hidden_layers == 2
    s, t = student.state_dict(), teacher.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[key], t[key])
    for mine, theirs in ((0, 0), (1, 2)):
        for name, value in student.model.layers[mine].state_dict().items():
            assert torch.equal(value, teacher.model.layers[theirs].state_dict()[name]), name
    assert student.model.layers[1].self_attn.layer_idx == 1


def test_student_shapes():
    teacher = build_model(ModelInit(**TEACHER), 512, seed=0)
    narrow = distill.build_student(
        teacher, DistillStep(student={"layers": 2, "intermediate": 64, "heads": 2}), CPU
    )
    assert narrow.config.intermediate_size == 64 and narrow.config.num_attention_heads == 2
    assert narrow.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    rand = distill.build_student(
        teacher, DistillStep(init="random", student={"hidden": 32, "heads": 2}), CPU
    )
    assert rand.config.hidden_size == 32 and rand.config.head_dim == 16
    assert rand(torch.randint(0, 512, (1, 8))).logits.shape == (1, 8, 512)
    with pytest.raises(StepError, match="hidden width"):
        distill.build_student(teacher, DistillStep(student={"hidden": 32}), CPU)


def test_distill_loss_falls_and_beats_scratch(tmp_path, corpus, teacher):
    body = {"student": {"layers": 2}, "max_steps": 30, "lr": 3e-3, "batch_size": 8,
            "warmup_steps": 0, "schedule": "constant", "alpha": 0.5, "temperature": 2.0}
    ctx = make_ctx(tmp_path / "kd", {"distill": body}, corpus)
    out = distill.run(ctx, ctx.step, copy.deepcopy(teacher))
    losses = [v for _, v in out.extra["losses"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert out.metrics["student_layers"] == 2 and out.metrics["compression"] > 1
    assert out.metrics["teacher_layers_used"] == [0, 2]
    kinds = {kind for kind, _ in ctx.emitter.events}
    assert "progress" in kinds
    # The same student (2 layers) trained from scratch with plain cross-entropy.
    scratch = distill.build_student(
        teacher, DistillStep(init="random", student={"layers": 2}), CPU
    )
    opts = TrainStep(**{k: v for k, v in body.items() if k in TrainStep.model_fields})
    scratch = train_loop(ctx, scratch, opts, checkpoints=False, emit=False).model
    assert loss_of(out.model, corpus) < loss_of(scratch, corpus)


def test_stopped_run_resumes_to_the_same_weights(tmp_path, corpus, teacher):
    body = {"student": {"layers": 2}, "max_steps": 6, "lr": 1e-3, "batch_size": 4,
            "checkpoint_every": 2, "log_every": 1, "warmup_steps": 2}
    straight_ctx = make_ctx(tmp_path / "a", {"distill": body}, corpus)
    straight = distill.run(straight_ctx, straight_ctx.step, copy.deepcopy(teacher)).model
    first = make_ctx(tmp_path / "b", {"distill": body}, corpus, stop_at=3)
    with pytest.raises(StopRequested):
        distill.run(first, first.step, copy.deepcopy(teacher))
    again = make_ctx(tmp_path / "b", {"distill": body}, corpus)
    resumed = distill.run(again, again.step, copy.deepcopy(teacher))
    assert resumed.metrics["steps_done"] == 6
    progress = [f["step"] for kind, f in again.emitter.events if kind == "progress"]
    assert progress == [4, 5, 6]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
