"""PEFT adapters in the train step: LoRA trains only the adapter, the output is a merged model any
transformers user loads, the adapter is saved beside it and loads with peft on the step's input, a
resumed run equals a straight one; gradient checkpointing changes memory, not results; hpo searches
adapter fields. QLoRA needs CUDA (bitsandbytes): refused elsewhere, exercised only on a CUDA machine."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import JobSpec, TrainOptions, TrainStep
from optjob.specs.errors import StepError
from optjob.steps import checkpoint as ckpt
from optjob.steps.adapters import ADAPTER_DIR
from optjob.steps.context import StopRequested
from optjob.steps.modeling import initial_model, save_model
from optjob.steps.train import run, train_loop

pytest.importorskip("peft")

MakeCtx = Callable[..., Any]
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}


def _ctx(make_ctx: MakeCtx, tiny_spec: Callable[..., dict[str, Any]], **train: Any) -> Any:
    spec = tiny_spec(steps=[{"train": {"max_steps": 6, "lr": 1e-2, "adapter": LORA, **train}}])
    return make_ctx(spec)


def _fresh(ctx: Any) -> torch.nn.Module:
    return initial_model(ctx.spec, ctx.tokenizer)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_the_adapter_and_saves_a_merged_model_and_the_adapter(
    make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ctx = _ctx(make_ctx, tiny_spec)
    step = ctx.spec.pipeline[0]
    base = _fresh(ctx)
    base_dir = save_model(copy.deepcopy(base), tmp_path / "base")  # the step's input, on disk
    out = run(ctx, step, base)

    m = out.metrics
    # 2 layers x (q,k,v,o: 64->64; gate,up: 64->128; down: 128->64), r=4: A (r x in) + B (out x r).
    per_layer = 4 * 4 * (64 + 64) + 2 * 4 * (64 + 128) + 4 * (128 + 64)
    assert m["trainable_params"] == 2 * per_layer
    assert m["params"] == sum(p.numel() for p in _fresh(ctx).parameters())
    assert m["trainable_params"] < m["params"] / 10
    assert m["steps"] == 6

    adapter_dir = ctx.step_dir() / ADAPTER_DIR
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert out.extra["adapter"] == str(adapter_dir)

    # The output is a plain transformers model: saved and reloaded without peft.
    assert not isinstance(out.model, PeftModel)
    saved = save_model(out.model, ctx.step_dir() / "model", ctx.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(saved)
    ids = ctx.corpus.eval_ids[:32][None]
    merged_logits = _logits(plain, ids)
    # The adapter learned something: the merged model is not the base.
    original = AutoModelForCausalLM.from_pretrained(base_dir)
    assert not torch.allclose(merged_logits, _logits(original, ids), atol=1e-4)
    # The adapter loads with peft on the step's input and gives the merged model's outputs.
    adapted = PeftModel.from_pretrained(original, adapter_dir)
    torch.testing.assert_close(_logits(adapted, ids), merged_logits, atol=1e-4, rtol=1e-4)


def test_only_adapter_weights_change_and_checkpoints_hold_only_them(
    make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path
) -> None:
    ctx = _ctx(make_ctx, tiny_spec)
    step = ctx.spec.pipeline[0]
    base = _fresh(ctx)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = train_loop(ctx, base, step.model_copy(update={"checkpoint_every": 3}), checkpoint_dir=tmp_path / "c")
    for name, p in res.model.named_parameters():
        if "lora_" not in name:  # frozen: exactly as it came in
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p.detach(), before[key]), name
    parts, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "c"))  # type: ignore[arg-type]
    assert parts["model"] and all("lora_" in k for k in parts["model"])


def test_lora_resume_after_stop_equals_straight_run(make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path) -> None:
    ctx = _ctx(make_ctx, tiny_spec)
    opts = TrainStep(max_steps=9, lr=1e-2, warmup_steps=2, checkpoint_every=3, grad_accum=2, log_every=3,
                     adapter=LORA)  # type: ignore[arg-type]  # adapter dropout: RNG must resume exactly too
    straight = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "a")

    steps = 0

    def stop_at_5(model: torch.nn.Module) -> None:
        nonlocal steps
        steps += 1
        if steps == 5:
            ctx.stop.request()

    with pytest.raises(StopRequested):
        train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "b", after_step=stop_at_5)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["step-000005", "step-000003"]
    ctx.stop.signalled = False
    resumed = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from == 5 and resumed.steps_done == 9
    assert resumed.losses == straight.losses
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=k)


def test_a_checkpoint_of_another_adapter_is_refused(make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path) -> None:
    ctx = _ctx(make_ctx, tiny_spec)
    opts = TrainStep(max_steps=4, lr=1e-2, checkpoint_every=2, adapter=LORA)  # type: ignore[arg-type]
    with pytest.raises(StopRequested):
        train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "a",
                   after_step=lambda m: ctx.stop.request())
    ctx.stop.signalled = False
    other = opts.model_copy(update={"adapter": opts.adapter.model_copy(update={"targets": ["q_proj"]})})  # type: ignore[union-attr]
    with pytest.raises(StepError, match="does not match"):
        train_loop(ctx, _fresh(ctx), other, checkpoint_dir=tmp_path / "a")


@pytest.mark.parametrize("adapter", [None, LORA])
def test_gradient_checkpointing_changes_nothing_but_memory(
    make_ctx: MakeCtx, tiny_spec: Any, adapter: dict[str, Any] | None
) -> None:
    spec = tiny_spec(model={"init": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 512,
                                     "dropout": 0.1}})  # fmt: skip
    ctx = make_ctx(spec)
    opts = TrainStep(max_steps=4, lr=1e-2, log_every=1, adapter=adapter)  # type: ignore[arg-type]
    plain = train_loop(ctx, _fresh(ctx), opts, checkpoints=False)
    model = _fresh(ctx)
    ckpted = train_loop(ctx, model, opts.model_copy(update={"gradient_checkpointing": True}), checkpoints=False)
    inner = ckpted.model.get_base_model() if adapter else ckpted.model  # type: ignore[operator]
    assert inner.is_gradient_checkpointing
    for (_, a), (_, b) in zip(plain.losses, ckpted.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_distill_takes_gradient_checkpointing_too() -> None:
    from optjob.specs import DistillStep

    assert DistillStep(gradient_checkpointing=True).gradient_checkpointing is True
    with pytest.raises(ValueError, match="adapter"):
        DistillStep.model_validate({"adapter": LORA})  # adapters belong to train


def test_unknown_target_modules_is_a_step_error(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    ctx = _ctx(make_ctx, tiny_spec)
    opts = TrainStep(max_steps=1, adapter={"targets": ["no_such_proj"]})  # type: ignore[arg-type]
    with pytest.raises(StepError, match=r"train\.adapter"):
        train_loop(ctx, _fresh(ctx), opts, checkpoints=False)


def test_qlora_is_refused_on_a_cpu_node(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    from optjob.steps.train import preflight

    with pytest.raises(StepError, match="CUDA"):
        preflight(TrainStep(adapter={"method": "qlora"}), torch.device("cpu"))  # type: ignore[arg-type]


# ---- hpo over adapter fields -------------------------------------------------------------------------------


def test_hpo_space_may_name_adapter_fields(tiny_spec: Any) -> None:
    good = tiny_spec(steps=[{"hpo": {"trials": 2, "space": {"train.adapter.r": {"choice": [4, 8]},
                                                            "train.adapter.alpha": {"uniform": [4, 16]}}}},
                            {"train": {"max_steps": 4, "adapter": LORA}}])  # fmt: skip
    JobSpec.model_validate(good)
    no_adapter = copy.deepcopy(good)
    del no_adapter["steps"][1]["train"]["adapter"]
    with pytest.raises(ValueError, match="has an adapter"):
        JobSpec.model_validate(no_adapter)
    bad_value = copy.deepcopy(good)
    bad_value["steps"][0]["hpo"]["space"] = {"train.adapter.r": {"choice": [0, 8]}}
    with pytest.raises(ValueError, match="not a valid r"):
        JobSpec.model_validate(bad_value)
    bad_field = copy.deepcopy(good)
    bad_field["steps"][0]["hpo"]["space"] = {"train.adapter.method": {"choice": ["lora"]}}
    with pytest.raises(ValueError, match="cannot be searched"):
        JobSpec.model_validate(bad_field)


def test_hpo_overrides_set_nested_adapter_fields(tiny_spec: Any) -> None:
    from optjob.steps.hpo import apply_overrides, split_params, trial_options

    spec = JobSpec.model_validate(tiny_spec(steps=[
        {"hpo": {"trials": 2, "space": {"train.adapter.r": {"choice": [4, 8]}}}},
        {"train": {"max_steps": 40, "adapter": LORA, "lr": 1e-3}}]))  # fmt: skip
    parts = split_params({"train.adapter.r": 8, "train.adapter.alpha": 32.0, "train.lr": 2e-3})
    opts = trial_options(spec.pipeline[1], parts["train"], trial_steps=5, pruner=False)  # type: ignore[arg-type]
    assert isinstance(opts, TrainStep) and opts.adapter is not None
    assert (opts.adapter.r, opts.adapter.alpha, opts.adapter.dropout, opts.lr) == (8, 32.0, 0.1, 2e-3)
    tuned = apply_overrides(spec, 0, parts).pipeline[1]
    assert isinstance(tuned, TrainStep) and tuned.adapter is not None
    assert (tuned.adapter.r, tuned.adapter.alpha, tuned.max_steps) == (8, 32.0, 40)


def test_hpo_trial_trains_an_adapter(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    from optjob.steps import hpo

    spec = tiny_spec(steps=[
        {"hpo": {"trials": 2, "trial_steps": 2, "pruner": "none", "sampler": "grid",
                 "space": {"train.adapter.r": {"choice": [2, 4]}}}},
        {"train": {"max_steps": 4, "adapter": LORA}}])  # fmt: skip
    ctx = make_ctx(spec)
    out = hpo.run(ctx, ctx.spec.pipeline[0], _fresh(ctx))
    assert out.metrics["trials_complete"] == 2
    assert out.extra["overrides"]["train"]["adapter.r"] in (2, 4)


# ---- QLoRA: CUDA only --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU (bitsandbytes 4-bit)")


@cuda
def test_qlora_trains_a_4bit_base_and_saves_a_merged_model(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = tiny_spec(steps=[{"train": {"max_steps": 4, "lr": 1e-2, "precision": "bf16",
                                       "adapter": {**LORA, "method": "qlora"}, "gradient_checkpointing": True}}])
    ctx = make_ctx(spec)
    ctx.device = torch.device("cuda")
    out = run(ctx, ctx.spec.pipeline[0], _fresh(ctx))
    assert 0 < out.metrics["trainable_params"] < out.metrics["params"]
    assert not isinstance(out.model, PeftModel)
    saved = save_model(out.model, ctx.step_dir() / "model", ctx.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(saved)  # merged in the base's own dtype, not 4-bit
    assert getattr(plain.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(ctx.step_dir() / "base")  # the input, saved to reload in 4-bit
    adapted = PeftModel.from_pretrained(base, ctx.step_dir() / ADAPTER_DIR)
    ids = ctx.corpus.eval_ids[:32][None]
    torch.testing.assert_close(_logits(adapted, ids), _logits(plain, ids), atol=1e-3, rtol=1e-3)


@cuda
def test_qlora_resume_after_stop_equals_straight_run(make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    ctx = make_ctx(tiny_spec())
    ctx.device = torch.device("cuda")
    opts = TrainStep(max_steps=6, lr=1e-2, checkpoint_every=2, precision="bf16",
                     adapter={**LORA, "method": "qlora"})  # type: ignore[arg-type]
    straight = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "a")
    with pytest.raises(StopRequested):
        train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "b",
                   after_step=lambda m: ctx.stop.request())
    ctx.stop.signalled = False
    resumed = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "b")
    assert resumed.losses == straight.losses


def test_train_options_default_to_no_adapter_and_no_checkpointing() -> None:
    opts = TrainOptions()
    assert opts.gradient_checkpointing is False and TrainStep().adapter is None


def test_a_dry_run_rehearses_qlora_as_lora_on_the_cpu(tiny_spec: Any) -> None:
    from optjob.steps.dry_run import proxy_spec

    spec = JobSpec.model_validate(tiny_spec(steps=[{"train": {"adapter": {**LORA, "method": "qlora"}}}]))
    proxy = proxy_spec(spec).pipeline[0]
    assert isinstance(proxy, TrainStep) and proxy.adapter is not None
    assert proxy.adapter.method == "lora" and proxy.adapter.r == LORA["r"]
