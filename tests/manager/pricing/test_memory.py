"""A plan that knows GPU memory (``manager/pricing/memory.py``).

The estimate is held against what a real training step allocates on this CPU. Measured: every
tensor storage created while the step runs, through a ``TorchDispatchMode`` that adds a storage's
bytes when an op creates it (views and in-place results share their input's storage and are not
counted again) and takes them off when the storage is freed (a weakref finalizer), keeping the
highest total; plus the model's own weights, there before. That is what ``torch.cuda.max_memory_allocated``
reports on a GPU, exact and repeatable (no allocator caching, page faults or other threads as in an
RSS delta; tracemalloc does not see torch's allocator). Then the plan: configs of real size (a
Llama-3.1-8B config.json) against the A10G's memory, offers dropped with their reason, QLoRA
refused without a CUDA GPU."""

from __future__ import annotations

import io
import json
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
from optjob.manager.pricing.memory import (
    GIB,
    HEADROOM,
    estimate_memory,
    eval_memory,
    fit_offers,
    holders,
    train_memory,
)
from optjob.manager.pricing.model_shape import model_shape, shape_from_config, shape_from_params
from optjob.specs import EvaluateStep, JobSpec, TrainStep
from optjob.specs.errors import PlanInfeasible

ROOT = Path(__file__).resolve().parents[3]
CATALOG = ROOT / "tests" / "data" / "skypilot-catalog" / "v8"
LLAMA_31_8B = {  # meta-llama/Llama-3.1-8B's config.json (the fields that size it)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
}  # fmt: skip


# ---- measured against a real step on this CPU -----------------------------------------------------------


def _measure_peak(run: Any) -> int:
    """Highest bytes of tensor storages alive while ``run()`` runs (created by it)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class Peak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.now = self.peak = 0
            self.seen: Any = WeakIdKeyDictionary()

        def _free(self, n: int) -> None:
            self.now -= n

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                if storage in self.seen or storage.data_ptr() in inputs:  # a view, an in-place result
                    continue
                n = storage.nbytes()
                self.seen[storage] = n
                weakref.finalize(storage, self._free, n)
                self.now += n
                self.peak = max(self.peak, self.now)
            return out

    tracker = Peak()
    with tracker:
        run()
    return tracker.peak


def _context(spec: JobSpec, corpus: Any, tmp_path: Path) -> Any:
    import torch
    from optjob.steps.context import StepContext, StopFlag
    from optjob.steps.events import Emitter

    return StepContext(spec=spec, job_dir=tmp_path / "job", index=0, emitter=Emitter(io.StringIO()),
                       device=torch.device("cpu"), dry_run=False, corpus=corpus, tokenizer=None, stop=StopFlag())


ARCH = {"family": "llama", "layers": 3, "hidden": 256, "heads": 4, "intermediate": 640, "vocab": 3000}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # (model.init changes, train options); none of these shapes was used to fit the coefficients.
    "full-adamw-fp32": ({}, {}),
    "full-bf16-autocast-accum2": ({}, {"precision": "bf16", "grad_accum": 2}),
    "full-gradient-checkpointing": ({}, {"gradient_checkpointing": True}),
    "full-sgd-gqa": ({"kv_heads": 1}, {"optimizer": "sgd"}),
    "lora-dropout": ({}, {"adapter": {"r": 8, "alpha": 16, "dropout": 0.1}}),
    "lora-qv-no-dropout-bf16": ({}, {"adapter": {"r": 4, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
                                     "precision": "bf16"}),
    "lora-gradient-checkpointing": ({}, {"adapter": {"r": 8}, "gradient_checkpointing": True}),
    "qwen2-wide-mlp": ({"family": "qwen2", "intermediate": 1024, "hidden": 192, "heads": 3}, {}),
    "mistral-long-seq": ({"family": "mistral", "kv_heads": 2}, {"batch_size": 2, "seq": 768}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_training_estimate_is_within_15_percent_of_the_measured_peak(case: str, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import torch
    from optjob.steps.data import Corpus
    from optjob.steps.modeling import build_model
    from optjob.steps.train import train_loop

    arch, train = CASES[case]
    train = dict(train)
    seq = int(train.pop("seq", 192))
    init = {**ARCH, **arch}
    spec = JobSpec.model_validate({"name": "m", "model": {"init": init}, "data": {"seq_len": seq},
                                   "steps": [{"train": {"max_steps": 2, "batch_size": 6, **train}}]})
    step = spec.pipeline[0]
    assert isinstance(step, TrainStep) and spec.model.init is not None
    torch.manual_seed(0)
    corpus = Corpus(torch.randint(0, init["vocab"], (40 * seq,)), seq, 0.2)
    model = build_model(spec.model.init, init["vocab"])
    before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ctx = _context(spec, corpus, tmp_path)
    # Two optimizer steps: the second runs with the optimizer's states in place, as every later one.
    dynamic = _measure_peak(lambda: train_loop(ctx, model, step, checkpoints=False, emit=False))
    measured = before + dynamic
    shape, _ = model_shape(spec.model)
    estimate = train_memory(shape, step, seq, gpu=False).total
    print(f"{case}: measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB "
          f"({estimate / measured - 1:+.1%})")
    assert abs(estimate / measured - 1) <= 0.15


@pytest.mark.parametrize("batch", [4, 7])
def test_evaluation_estimate_is_within_15_percent_of_the_measured_peak(batch: int) -> None:
    import torch
    from optjob.steps.data import Corpus
    from optjob.steps.evaluate import eval_loss
    from optjob.steps.modeling import build_model

    spec = JobSpec.model_validate({"name": "m", "model": {"init": ARCH}, "data": {"seq_len": 192},
                                   "steps": [{"evaluate": {"batch_size": batch, "metrics": ["perplexity"]}}]})
    assert spec.model.init is not None
    torch.manual_seed(0)
    corpus = Corpus(torch.randint(0, 3000, (60 * 192,)), 192, 0.5)
    model = build_model(spec.model.init, 3000)
    before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    dynamic = _measure_peak(lambda: eval_loss(model, corpus, batch, 2, torch.device("cpu")))
    step = spec.pipeline[0]
    assert isinstance(step, EvaluateStep)
    shape, _ = model_shape(spec.model)
    estimate = eval_memory(shape, step, 192, 4.0, gpu=False).total
    measured = before + dynamic
    print(f"eval batch {batch}: measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB "
          f"({estimate / measured - 1:+.1%})")
    assert abs(estimate / measured - 1) <= 0.15


# ---- the model's shape ---------------------------------------------------------------------------------------


def test_shapes_from_a_config_a_known_hub_id_and_a_parameter_count(tmp_path: Path) -> None:
    llama = shape_from_config(LLAMA_31_8B)
    assert llama.params == 8_030_261_248  # the model card's count, embeddings included
    assert (llama.kv_dim, llama.dtype_bytes) == (1024, 2)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    from_path, note = model_shape(JobSpec.model_validate(
        {"name": "m", "model": {"path": str(tmp_path)}, "steps": [{"train": {}}]}).model)
    assert from_path == llama and note is None
    hub, note = model_shape(JobSpec.model_validate(
        {"name": "m", "model": {"hf": "meta-llama/Llama-3.1-8B"}, "steps": [{"train": {}}]}).model)
    assert hub.params == llama.params and note is None
    guessed, note = model_shape(JobSpec.model_validate(
        {"name": "m", "model": {"hf": "someone/unknown-7b", "params": 7_000_000_000}, "steps": [{"train": {}}]}).model)
    assert abs(guessed.params / 7e9 - 1) < 0.1 and note is not None and "model.params" in note
    assert shape_from_params(7_000_000_000).params <= 7_000_000_000


def test_lora_parameter_count_matches_peft() -> None:
    pytest.importorskip("peft")
    from optjob.specs.steps import AdapterSpec
    from optjob.steps.adapters import lora_config
    from optjob.steps.modeling import build_model
    from peft import get_peft_model

    spec = JobSpec.model_validate({"name": "m", "model": {"init": {**ARCH, "kv_heads": 2}}, "steps": [{"train": {}}]})
    assert spec.model.init is not None
    shape, _ = model_shape(spec.model)
    for adapter in (AdapterSpec(r=8), AdapterSpec(r=4, targets=["q_proj", "v_proj"])):
        peft_model = get_peft_model(build_model(spec.model.init, 3000), lora_config(adapter))
        trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert shape.lora_params(adapter) == trained


def test_sharding_splits_what_is_per_parameter() -> None:
    shape = shape_from_config(LLAMA_31_8B)
    step = TrainStep(batch_size=8, precision="bf16", gradient_checkpointing=True)
    one = train_memory(shape, step, 1024, world=8)
    sharded = train_memory(shape, step, 1024, world=8, sharded=True)
    assert sharded.total < one.total / 3
    # Its peak: the whole model gathered on each process as the step ends, beside its shard (and one
    # block gathered); the optimizer state, an eighth each, is freed by then.
    n = shape.params
    assert sharded.parts["weights"] == pytest.approx(4.0 * n + 4.0 * n / 8 + 4.0 * n / shape.layers)
    assert "optimizer" not in sharded.parts and one.parts["optimizer"] == pytest.approx(8.0 * n)


# ---- the plan --------------------------------------------------------------------------------------------------


@pytest.fixture
def plan_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPTJOB_CATALOG_DIR", str(CATALOG))
    monkeypatch.setenv("OPTJOB_LIVE_PRICES", "0")
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return folder


def _llama_spec(folder: Path, train: dict[str, Any], accelerators: Any = "A10G:1",
                resources: dict[str, Any] | None = None) -> JobSpec:
    return JobSpec.model_validate({
        "name": "llama8b", "model": {"path": str(folder)}, "data": {"seq_len": 512},
        "steps": [{"train": {"max_steps": 50, "batch_size": 4, "precision": "bf16", **train}}],
        "resources": {"cloud": "aws", "accelerators": accelerators, **(resources or {})},
        "budget": {"max_usd": 50}, "storage": {"artifacts": "s3://bucket/llama8b"}})  # fmt: skip


def test_full_adamw_8b_on_an_a10g_is_refused_saying_what_it_needs(plan_env: Path) -> None:
    from optjob.manager.commands.plan import check_feasible
    from optjob.manager.planner import make_plan

    plan = make_plan(_llama_spec(plan_env, {}))
    assert plan.chosen is None and not plan.offers
    with pytest.raises(PlanInfeasible) as info:
        check_feasible(plan)
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message
    need = float(message.split("steps[0] train needs ")[1].split(" GiB")[0])
    assert need > 8.03e9 * 16 / GIB  # fp32 weights, gradients and AdamW's two moments, at least
    assert "GPUs that hold it: H200, B200" in message
    assert any(n.startswith("dropped ") and "A10G:1" in n for n in plan.notes)


def test_qlora_8b_fits_one_a10g_and_plan_json_says_how_much(plan_env: Path) -> None:
    from optjob.manager.commands.plan import check_feasible
    from optjob.manager.planner import make_plan

    spec = _llama_spec(plan_env, {"gradient_checkpointing": True, "adapter": {"method": "qlora", "r": 16}})
    plan = make_plan(spec)
    check_feasible(plan)
    assert plan.chosen is not None and plan.chosen.accelerators == "A10G:1"
    data = json.loads(plan.dumps())
    for offer in [*data["offers"], data["chosen"]]:
        assert offer["gpu_memory_gb"] == 22.35
        assert 0 < offer["memory_gb"] <= HEADROOM * 22.35
    peak = estimate_memory(spec).peak
    assert data["chosen"]["memory_gb"] == pytest.approx(peak.gib, abs=1e-3)
    train = next(s for s in estimate_memory(spec).steps if s.index == 0 and "train" in s.what)
    assert train.parts["weights"] < 8.03e9 * 1.0  # 4-bit Linear weights: about a byte a weight with fp32 embeddings


def test_offers_that_do_not_fit_are_dropped_and_the_cheapest_that_fits_wins(plan_env: Path) -> None:
    from optjob.manager.planner import make_plan

    both = {"accelerators": ["A10G:1", "A100-80GB:1"], "resources": {"cloud": "any"}}
    spec = _llama_spec(plan_env, {"adapter": {"method": "lora"}, "batch_size": 8}, **both)
    cheap_first = make_plan(_llama_spec(plan_env, {"adapter": {"method": "qlora"}, "gradient_checkpointing": True},
                                        **both))
    assert cheap_first.chosen is not None and cheap_first.chosen.accelerators == "A10G:1"  # cheaper, and it fits
    plan = make_plan(spec)
    assert plan.chosen is not None and plan.chosen.accelerators == "A100-80GB:1"
    assert {o.accelerators for o in plan.offers} == {"A100-80GB:1"}
    note = next(n for n in plan.notes if n.startswith("dropped "))
    assert "A10G:1 (22.35 GiB per GPU): steps[0] train needs" in note
    assert plan.chosen.memory_gb is not None and plan.chosen.memory_gb > 22.35


def test_qlora_is_refused_at_plan_time_on_a_cpu_run(plan_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.manager.commands.plan import check_feasible
    from optjob.manager.planner import make_plan
    from optjob.manager.pricing import memory

    monkeypatch.setattr(memory, "local_has_cuda", lambda: False)
    spec = _llama_spec(plan_env, {"adapter": {"method": "qlora"}})
    plan = make_plan(spec, local=True)
    with pytest.raises(PlanInfeasible) as info:
        check_feasible(plan)
    assert "qlora needs a CUDA GPU" in str(info.value) and "\n" not in str(info.value)
    lora = make_plan(_llama_spec(plan_env, {"adapter": {"method": "lora"}}), local=True)
    check_feasible(lora)  # a CPU run: memory not checked against a GPU


def test_plan_cli_exits_3_for_qlora_on_this_cpu(plan_env: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has a CUDA GPU")
    spec = tmp_path / "qlora.yaml"
    spec.write_text(f"name: q\nmodel: {{path: {plan_env}}}\nsteps:\n  - train: {{adapter: {{method: qlora}}}}\n")
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "plan", str(spec)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OPTJOB_HOME": str(tmp_path / "h")})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "qlora needs a CUDA GPU" in lines[0]


def test_the_qlora_example_plans_on_one_a10g(plan_env: Path) -> None:
    from optjob.manager.commands.plan import check_feasible
    from optjob.manager.planner import make_plan
    from optjob.specs import load_spec

    plan = make_plan(load_spec(ROOT / "examples" / "qlora-8b.yaml"))
    check_feasible(plan)
    assert plan.chosen is not None and plan.chosen.accelerators == "A10G:1" and plan.chosen.spot
    assert plan.chosen.memory_gb is not None and plan.chosen.memory_gb <= HEADROOM * 22.35


def test_nothing_holds_it_says_so() -> None:
    assert holders(1000.0) == []
    assert holders(35.0)[0] == "A100"
    assert "A10G" in holders(20.0) and "T4" not in holders(20.0)


def test_an_unknown_gpu_or_a_tpu_is_not_checked(plan_env: Path) -> None:
    from optjob.manager.pricing.offers import Offer

    spec = _llama_spec(plan_env, {})
    offers = [Offer(cloud="gcp", region="r", zone=None, instance_type="x", accelerators=f"{name}:{n}",
                    accelerator_name=name, accelerator_count=n, spot=False, hourly_usd=1.0, vcpus=8,
                    memory_gb=64) for name, n in (("NEWGPU", 1), ("tpu-v5litepod-8", 1), ("T4", 1))]
    fit = fit_offers(spec, offers)
    assert [o.accelerator_name for o in fit.kept] == ["NEWGPU", "tpu-v5litepod-8"]
    assert fit.of(offers[0])[1] is None and math.isclose(fit.of(offers[2])[1] or 0, 15.0)


# ---- sharded training: the plan picks fsdp where a step fits a node's GPUs only sharded ----------------------


def test_full_8b_on_eight_a100s_is_sharded_and_the_spec_carries_it(plan_env: Path) -> None:
    from optjob.manager.commands.plan import check_feasible
    from optjob.manager.planner import make_plan, resolved_spec
    from optjob.manager.pricing.memory import step_strategies

    spec = _llama_spec(plan_env, {}, accelerators="A100:8", resources={"cloud": "any"})
    plan = make_plan(spec)
    check_feasible(plan)
    assert plan.chosen is not None and plan.chosen.accelerators == "A100:8"
    data = json.loads(plan.dumps())
    assert data["steps"][0]["strategy"] == "fsdp" and data["steps"][0]["summary"].endswith(", strategy fsdp")
    assert plan.chosen.memory_gb is not None and plan.chosen.memory_gb <= HEADROOM * 40
    # Unsharded, each A100 would need the whole model, its gradients and AdamW's moments.
    strategies, sharded = step_strategies(spec, 8, 40.0)
    ddp = estimate_memory(spec, world=8)
    assert strategies == {0: "fsdp"} and ddp.peak.gib > 8.03e9 * 16 / GIB > sharded.peak.gib
    # What apply writes to job.json: the plan's pick, as the workload reads it.
    resolved = resolved_spec(spec, plan)
    assert resolved.pipeline[0].strategy == "fsdp" and spec.pipeline[0].strategy is None
    assert resolved.model_copy(update={"steps": spec.steps}) == spec


def test_what_fits_unsharded_stays_ddp_and_a_spec_may_say_which(plan_env: Path) -> None:
    from optjob.manager.commands.plan import check_feasible
    from optjob.manager.planner import make_plan, resolved_spec
    from optjob.manager.pricing.memory import step_strategies

    lora = _llama_spec(plan_env, {"adapter": {"method": "lora"}, "gradient_checkpointing": True},
                       accelerators="A100:8", resources={"cloud": "any"})
    plan = make_plan(lora)
    assert plan.chosen is not None and [s.strategy for s in plan.steps] == ["ddp"]
    assert resolved_spec(lora, plan) is lora
    one = make_plan(_llama_spec(plan_env, {"adapter": {"method": "qlora"}, "gradient_checkpointing": True}))
    assert [s.strategy for s in one.steps] == ["single"]
    # Asked for ddp, the full fine-tune does not fit an A100: refused, saying what it needs.
    refused = make_plan(_llama_spec(plan_env, {"strategy": "ddp"}, accelerators="A100:8", resources={"cloud": "any"}))
    with pytest.raises(PlanInfeasible, match=r"steps\[0\] train needs \d+\.\d GiB per GPU"):
        check_feasible(refused)
    # Asked for fsdp where it would fit unsharded: sharded all the same.
    small = _llama_spec(plan_env, {"strategy": "fsdp", "gradient_checkpointing": True}, accelerators="H200:8")
    assert step_strategies(small, 8, 139.0)[0] == {0: "fsdp"}
    assert step_strategies(small, 1, 139.0)[0] == {0: "single"}


def test_a_compare_variant_is_sized_and_its_qlora_needs_cuda() -> None:
    """The plan sized only the steps before ``compare``: a variant that trains the full model would
    have been launched on a GPU it does not fit."""
    from optjob.manager.pricing.memory import needs_cuda
    from optjob.specs import loads_spec

    spec = loads_spec("""name: cmp
model: {init: {layers: 32, hidden: 4096, heads: 32, intermediate: 11008, vocab: 32000}}
steps:
  - quantize: {method: fp16}
  - compare:
      light: [{prune: {method: magnitude, sparsity: 0.5}}]
      full: [{train: {max_steps: 10, batch_size: 8}}]
      qlora: [{train: {max_steps: 10, adapter: {method: qlora}}}]
""")
    plan = estimate_memory(spec, gpu=True)
    variant_rows = [m for m in plan.steps if m.what.startswith("compare ")]
    assert {m.what.split()[1] for m in variant_rows} == {"light", "full", "qlora"}
    assert all(m.index == 1 for m in variant_rows)
    assert plan.peak.what == "compare full step 0 train"  # full AdamW of 6.7B: the job's peak
    assert needs_cuda(spec) == 1
