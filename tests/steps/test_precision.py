"""``precision: checkpoint``: train in the checkpoint's own dtype (no fp32 master weights, no
autocast); every other precision still upcasts a half-precision checkpoint to fp32 master weights."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import JobSpec
from optjob.specs.errors import SpecError
from optjob.steps import train
from optjob.steps.context import StepContext, StopFlag
from optjob.steps.data import Corpus
from optjob.steps.device import autocast_dtype
from optjob.steps.events import Emitter
from optjob.steps.modeling import load_hub_model, load_model
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 256
CPU = torch.device("cpu")
BODY = {"max_steps": 3, "lr": 1e-2, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 50}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    return Corpus(torch.randint(0, VOCAB, (3000,), generator=g), seq_len=16, eval_fraction=0.2)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bf16") / "llama"
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def make_ctx(tmp_path: Path, body: dict[str, Any], corpus: Corpus) -> StepContext:
    init = {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64, "vocab": VOCAB}
    spec = JobSpec.model_validate({"name": "t", "model": {"init": init}, "steps": [{"train": body}]})
    return StepContext(spec=spec, job_dir=tmp_path, index=0, emitter=Emitter(io.StringIO()), device=CPU,
                       dry_run=False, corpus=corpus, tokenizer=None, stop=StopFlag())  # fmt: skip


def test_checkpoint_precision_trains_a_bf16_checkpoint_in_bf16(tmp_path, corpus, bf16_checkpoint):
    model = load_model(bf16_checkpoint, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = make_ctx(tmp_path, {**BODY, "precision": "checkpoint"}, corpus)
    out = train.run(ctx, ctx.step, model)
    assert {p.dtype for p in out.model.parameters()} == {torch.bfloat16}
    assert out.metrics["weights_dtype"] == "bfloat16"
    assert "upcast" not in out.metrics
    after = out.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train
    assert torch.isfinite(torch.tensor(out.metrics["train_loss"]))


def test_default_precision_still_upcasts_a_bf16_checkpoint(tmp_path, corpus, bf16_checkpoint):
    model = load_model(bf16_checkpoint, CPU)
    ctx = make_ctx(tmp_path, dict(BODY), corpus)
    assert ctx.step.precision == "fp32"
    out = train.run(ctx, ctx.step, model)
    assert {p.dtype for p in out.model.parameters()} == {torch.float32}
    assert out.metrics["weights_dtype"] == "float32"
    assert out.metrics["upcast"]["from"] == ["bfloat16"]


def test_checkpoint_precision_runs_no_autocast():
    assert autocast_dtype("checkpoint", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16


def test_checkpoint_precision_keeps_a_hub_model_in_its_dtype_on_a_cpu(bf16_checkpoint):
    """``load_hub_model`` reads a folder as it reads a hub id: fp32 on a CPU unless asked to keep the dtype."""
    assert next(load_hub_model(str(bf16_checkpoint), CPU).parameters()).dtype == torch.float32
    kept = load_hub_model(str(bf16_checkpoint), CPU, keep_dtype=True)
    assert next(kept.parameters()).dtype == torch.bfloat16


def test_checkpoint_precision_with_qlora_is_refused_by_the_spec():
    body = {**BODY, "precision": "checkpoint", "adapter": {"method": "qlora"}}
    with pytest.raises((ValidationError, SpecError), match="4-bit"):
        JobSpec.model_validate({"name": "t", "model": {"init": {"layers": 1}}, "steps": [{"train": body}]})


def test_the_plan_prices_checkpoint_precision_at_the_checkpoints_dtype(bf16_checkpoint):
    """An init model is fp32: its peak is the fp32 one; a bf16 folder runs at the bf16 peak."""
    from optjob.manager.pricing.estimate import workload

    steps = [{"train": {**BODY, "precision": "checkpoint"}}]
    fresh = JobSpec.model_validate({"name": "t", "model": {"init": {"layers": 1}}, "steps": steps})
    folder = JobSpec.model_validate({"name": "t", "model": {"path": str(bf16_checkpoint)}, "steps": steps})
    assert workload(fresh)[0][0].precision == "fp32"
    assert workload(folder)[0][0].precision == "bf16"
