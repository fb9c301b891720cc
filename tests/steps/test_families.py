"""Real model families and dtypes through every step.

A family matrix of tiny random models (2 layers, hidden 32, vocab 256; built and saved here
by ``benchmarks/tiny_families.py``, which benchmarks/families.py tabulates too):
gpt2, llama (untied and tied), mistral, qwen2, qwen3, phi3, phi, gpt_neox, opt, gemma,
gemma2, and bf16 / fp16 checkpoints. Each step's module runs on the loaded checkpoint; its
output is saved as the runner saves it and reloaded with plain
``AutoModelForCausalLM.from_pretrained(folder)``, which must give the loss measured on the
model in memory. What a step refuses, ``families.unsupported_reason`` predicts from the
config alone, and the step refuses with that reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import DistillStep, PruneStep, QuantizeStep, TrainStep
from optjob.specs.errors import StepError
from optjob.steps import distill, families, prune, quantize, structure, train
from optjob.steps.context import StepContext
from optjob.steps.data import Corpus
from optjob.steps.evaluate import eval_loss
from optjob.steps.modeling import count_params, load_model, model_size_bytes, save_model
from optjob.steps.structure import is_tied
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.tiny_families import FAMILIES, NAMES, NO_HEADS, VOCAB, build_checkpoints, random_corpus, step_context
from benchmarks.tiny_families import LLAMA_FIELDS as _LLAMA

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return random_corpus()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family's tiny random model, saved in its dtype."""
    return build_checkpoints(tmp_path_factory.mktemp("families"))


def parent(checkpoints: dict[str, Path], name: str) -> torch.nn.Module:
    """The checkpoint as the runner loads it (``load_model``: dtype auto)."""
    return load_model(checkpoints[name], CPU)


def make_ctx(tmp_path: Path, step: dict[str, Any], corpus: Corpus) -> StepContext:
    ctx: StepContext = step_context(tmp_path, step, corpus)
    return ctx


def loss_of(model: torch.nn.Module, corpus: Corpus) -> float:
    return eval_loss(model, corpus, 4, 2, CPU)[0]


def reload_matches(model: torch.nn.Module, folder: Path, corpus: Corpus) -> torch.nn.Module:
    """Save ``model`` as the runner does, reload it with plain from_pretrained, and check
    the reload gives the loss of the model in memory."""
    saved = save_model(model, folder)
    again = AutoModelForCausalLM.from_pretrained(saved)
    assert loss_of(again, corpus) == pytest.approx(loss_of(model, corpus), rel=1e-5, abs=1e-5)
    return again


def expect(config: Any, step: Any, run: Any) -> Any:
    """Run ``run()``; it must fail with the config-level reason exactly when there is one."""
    reason = families.unsupported(config, step)
    if reason is None:
        return run()
    with pytest.raises(StepError, match=reason.reason[:40].replace("(", r"\(").replace(")", r"\)")):
        run()
    return None


# --------------------------------------------------------------------------- prune


@pytest.mark.parametrize("name", NAMES)
def test_magnitude_prune_every_family(tmp_path, corpus, checkpoints, name):
    model = parent(checkpoints, name)
    ctx = make_ctx(tmp_path, {"prune": {"sparsity": 0.5}}, corpus)
    out = prune.run(ctx, ctx.step, model)
    assert out.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    if name == "gpt2":  # its projections are Conv1D
        assert {type(m).__name__ for _, m in prune.prunable_linears(out.model)} == {"Conv1D"}
    again = reload_matches(out.model, tmp_path / "model", corpus)
    assert prune.linear_sparsity(again) == pytest.approx(out.metrics["sparsity"])


@pytest.mark.parametrize("name", NAMES)
def test_structured_prune_every_family(tmp_path, corpus, checkpoints, name):
    model = parent(checkpoints, name)
    tied = is_tied(model)
    dtype = next(model.parameters()).dtype
    body = {"method": "structured", "mlp_fraction": 0.5, "heads_fraction": 0.5}
    ctx = make_ctx(tmp_path, {"prune": body}, corpus)
    step = ctx.step
    if name in NO_HEADS:
        reason = families.unsupported_reason(model.config, step)
        assert reason is not None and "heads_fraction: 0" in reason and "init:" not in reason
    out = expect(model.config, step, lambda: prune.run(ctx, step, model))
    if out is None:  # heads cannot be cut here: the MLP can
        step = PruneStep(method="structured", mlp_fraction=0.5)
        assert families.unsupported(model.config, step) is None
        out = prune.run(ctx, step, model)
    else:
        assert out.metrics["attention_heads"] == 2
    m = out.metrics
    assert m["intermediate_size"] == 32 and m["params_after"] < m["params_before"]
    assert is_tied(out.model) == tied and next(out.model.parameters()).dtype == dtype
    again = reload_matches(out.model, tmp_path / "model", corpus)
    assert families.intermediate_size(again.config) == 32 and is_tied(again) == tied


def test_structured_prune_zeroes_what_it_cuts_in_fused_layouts():
    """phi3 (fused qkv and gate_up, grouped-query) cut to half: the same logits as the
    full model with the cut neurons' down columns and heads' output columns zeroed."""
    config = AutoConfig.for_model("phi3", vocab_size=VOCAB, **FAMILIES["phi3"][1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    small = prune.shrink(model, intermediate=32, heads=2).eval()
    zeroed = AutoModelForCausalLM.from_config(config).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block, zb in zip(structure.blocks(model), structure.blocks(zeroed), strict=True):
            keep = prune._top(structure.mlp_scores(block.mlp), 32)
            drop = torch.ones(64, dtype=torch.bool)
            drop[keep] = False
            zb.mlp.down.module.weight[:, drop] = 0
            q_keep, _ = prune.keep_heads(structure.head_scores(block.attention, 4, 8), 2, 2)
            for h in set(range(4)) - set(q_keep.tolist()):
                zb.attention.out.module.weight[:, h * 8 : (h + 1) * 8] = 0
    x = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(small(x).logits, zeroed(x).logits, atol=1e-5, rtol=1e-5)


def test_grouped_query_heads_fraction_is_predicted_with_a_prune_hint(checkpoints):
    config = AutoConfig.from_pretrained(checkpoints["llama"])  # 4 heads over 2 kv heads
    bad = PruneStep(method="structured", heads_fraction=0.25)  # keeps 3
    reason = families.unsupported_reason(config, bad)
    assert reason is not None and "multiple of 2" in reason and "0.5" in reason
    assert families.unsupported(config, PruneStep(method="structured", heads_fraction=0.5)) is None
    as_dict = config.to_dict()  # a config.json read without transformers
    assert families.unsupported_reason(as_dict, bad) == reason


def test_mixture_of_experts_mlp_is_refused_from_the_config_and_the_structure(tmp_path, corpus):
    fields = dict(_LLAMA, num_key_value_heads=2, num_local_experts=2)
    config = AutoConfig.for_model("mixtral", vocab_size=VOCAB, **fields)
    model = AutoModelForCausalLM.from_config(config)
    step = PruneStep(method="structured", mlp_fraction=0.5)
    reason = families.unsupported(config, step)
    assert reason is not None and "mixture-of-experts" in reason.reason and "mlp_fraction: 0" in reason.hint
    with pytest.raises(StepError, match="mixture-of-experts"):
        prune.structured_prune(model, step)
    with pytest.raises(StepError, match="cannot cut mixtral layers"):  # the structure says so too
        prune.shrink(model, intermediate=32)


# --------------------------------------------------------------------------- distill


DISTILL = {"max_steps": 2, "lr": 1e-3, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 50,
           "log_every": 1, "alpha": 0.5}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_distill_teacher_layers_every_family(tmp_path, corpus, checkpoints, name):
    """A 1-layer student with half the MLP and (where the family allows) half the heads."""
    teacher = parent(checkpoints, name)
    body = {**DISTILL, "student": {"layers": 1, "intermediate": 32, "heads": 2}}
    ctx = make_ctx(tmp_path, {"distill": body}, corpus)
    step = ctx.step
    if name in NO_HEADS:
        reason = families.unsupported_reason(teacher.config, step)
        assert reason is not None and "student.heads" in reason and "method:" not in reason
        with pytest.raises(StepError, match="head width") as err:
            distill.run(ctx, step, teacher)
        assert "init: random" in (err.value.hint or "")
        step = DistillStep(**{**body, "student": {"layers": 1, "intermediate": 32}})
    out = distill.run(ctx, step, teacher)
    student = out.model
    assert next(student.parameters()).dtype == torch.float32
    assert families.intermediate_size(student.config) == 32
    assert out.metrics["student_layers"] == 1 and out.metrics["compression"] > 1
    assert is_tied(student) == is_tied(teacher)
    reload_matches(student, tmp_path / "model", corpus)


@pytest.mark.parametrize("name", NAMES)
def test_distill_random_narrower_student_every_family(tmp_path, corpus, checkpoints, name):
    teacher = parent(checkpoints, name)
    body = {**DISTILL, "init": "random", "student": {"layers": 1, "hidden": 16, "heads": 2}}
    ctx = make_ctx(tmp_path, {"distill": body}, corpus)
    assert families.unsupported(teacher.config, ctx.step) is None
    out = distill.run(ctx, ctx.step, teacher)
    student = out.model
    assert families.hidden_size(student.config) == 16 and families.num_heads(student.config) == 2
    assert student.get_input_embeddings().weight.shape[1] == 16
    assert out.metrics["student_params"] < out.metrics["teacher_params"]
    reload_matches(student, tmp_path / "model", corpus)


def test_opt_student_shrinks_its_embedding_projection(checkpoints):
    teacher = parent(checkpoints, "opt")
    step = DistillStep(init="random", student={"hidden": 16, "heads": 2, "intermediate": 24})
    student = distill.build_student(teacher, step, CPU)
    assert student.config.word_embed_proj_dim == 16 and student.config.ffn_dim == 24
    decoder = student.model.decoder
    assert decoder.project_in is None and decoder.project_out is None


# --------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight"])
def test_int8_every_family(tmp_path, corpus, checkpoints, name, method):
    model = parent(checkpoints, name)
    dtype, tied = next(model.parameters()).dtype, is_tied(model)
    base = loss_of(model, corpus)
    ctx = make_ctx(tmp_path, {"quantize": {"method": method}}, corpus)
    out = quantize.run(ctx, ctx.step, model)
    m = out.metrics
    assert m["float_dtype_before"] == m["float_dtype_after"] == str(dtype).removeprefix("torch.")
    assert m["params_after"] <= m["params_before"]
    # the embeddings stay in the checkpoint's dtype: int8 saves most on an fp32 checkpoint
    assert m["size_ratio"] < (0.8 if dtype == torch.float32 else 0.95)
    assert m["tied_embeddings"] == tied
    got = loss_of(out.model, corpus)
    assert got == pytest.approx(base, rel=0.02)
    if name == "gpt2":
        assert any("gpt_bigcode" in c for c in m["conversions"])
    again = reload_matches(out.model, tmp_path / "model", corpus)
    assert count_params(again) == m["params_after"]
    assert is_tied(again) == tied
    assert model_size_bytes(tmp_path / "model") < model_size_bytes(checkpoints[name])
    assert not (tmp_path / "model" / quantize.RECIPE_FILE).exists()
    assert load_model(tmp_path / "model").config.quantization_config is not None  # the runner's load


@pytest.mark.parametrize("name", ["gpt2", "llama-tied", "llama-bf16", "qwen3-fp16"])
@pytest.mark.parametrize("method", ["fp16", "bf16"])
def test_casts_reload(tmp_path, corpus, checkpoints, name, method):
    model = parent(checkpoints, name)
    tied = is_tied(model)
    ctx = make_ctx(tmp_path, {"quantize": {"method": method}}, corpus)
    out = quantize.run(ctx, ctx.step, model)
    assert out.metrics["float_dtype_after"] == {"fp16": "float16", "bf16": "bfloat16"}[method]
    again = reload_matches(out.model, tmp_path / "model", corpus)
    assert is_tied(again) == tied


def test_gpt2_linear_twin_has_the_same_logits(checkpoints):
    model = parent(checkpoints, "gpt2").eval()
    twin = structure.gpt2_to_linear(model).eval()
    assert twin.config.model_type == "gpt_bigcode" and not structure.has_conv1d(twin)
    assert is_tied(twin)
    x = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(twin(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_tied_int8_is_smaller_and_has_no_more_params(tmp_path, corpus, checkpoints):
    """The tied pair stays one float tensor: today lm_head got its own int8 copy."""
    model = parent(checkpoints, "llama-tied")
    ctx = make_ctx(tmp_path, {"quantize": {"method": "int8-dynamic"}}, corpus)
    out = quantize.run(ctx, ctx.step, model)
    q = out.model
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert count_params(q) == out.metrics["params_before"]
    assert out.metrics["size_bytes_after"] < out.metrics["size_bytes_before"]


def test_int8_dynamic_on_a_bf16_checkpoint(tmp_path, corpus, checkpoints):
    """Today: 'expected scalar type Float but found BFloat16'."""
    model = parent(checkpoints, "llama-bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ctx = make_ctx(tmp_path, {"quantize": {"method": "int8-dynamic"}}, corpus)
    out = quantize.run(ctx, ctx.step, model)
    assert out.metrics["float_dtype_after"] == "bfloat16"
    assert torch.isfinite(torch.tensor(loss_of(out.model, corpus)))


def test_already_quantized_is_refused(tmp_path, corpus, checkpoints):
    model = parent(checkpoints, "llama")
    ctx = make_ctx(tmp_path, {"quantize": {"method": "int8-weight"}}, corpus)
    saved = save_model(quantize.run(ctx, ctx.step, model).model, tmp_path / "q")
    config = AutoConfig.from_pretrained(saved)
    assert "already quantized" in (families.unsupported_reason(config, QuantizeStep()) or "")


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("name", ["llama-bf16", "qwen3-fp16"])
def test_half_checkpoint_trains_in_fp32_master_weights(tmp_path, corpus, checkpoints, name):
    model = parent(checkpoints, name)
    half = next(model.parameters()).dtype
    assert half in (torch.bfloat16, torch.float16)
    body = {"max_steps": 3, "lr": 1e-3, "batch_size": 4, "warmup_steps": 0, "log_every": 1,
            "precision": "bf16", "checkpoint_every": 50}  # fmt: skip
    ctx = make_ctx(tmp_path, {"train": body}, corpus)
    out = train.run(ctx, ctx.step, model)
    assert {p.dtype for p in out.model.parameters()} == {torch.float32}
    assert out.metrics["upcast"]["from"] == [str(half).removeprefix("torch.")]
    assert out.metrics["upcast"]["to"] == "float32"
    assert is_tied(out.model) == (name == "qwen3-fp16")
    reload_matches(out.model, tmp_path / "model", corpus)


def test_fp32_training_records_no_upcast(tmp_path, corpus, checkpoints):
    model = parent(checkpoints, "llama")
    opts = TrainStep(max_steps=1, batch_size=4, checkpoint_every=50)
    ctx = make_ctx(tmp_path, {"train": opts.model_dump()}, corpus)
    assert train.train_loop(ctx, model, opts, checkpoints=False, emit=False).upcast is None


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_outputs_reload_to_their_recorded_loss(
    tmp_path, shared_cache, make_ctx, tiny_spec, restore_signals, capsys
):
    """A tied bf16 qwen3 checkpoint through train (bf16 autocast), structured prune,
    a narrower distilled student and int8-dynamic, run by the runner: every step's saved
    output reloads with plain from_pretrained to the eval loss results.json recorded."""
    import json

    from optjob.specs import EvaluateStep
    from optjob.steps import runner
    from optjob.steps.layout import JobFile

    torch.manual_seed(0)
    fields = dict(FAMILIES["qwen3-fp16"][1])
    config = AutoConfig.for_model("qwen3", vocab_size=512, **fields)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    fast = {"batch_size": 4, "warmup_steps": 0, "checkpoint_every": 50, "log_every": 1}
    steps = [
        {"train": {"max_steps": 3, "precision": "bf16", **fast}},
        {"prune": {"method": "structured", "mlp_fraction": 0.5, "heads_fraction": 0.5}},
        {"distill": {"init": "random", "student": {"hidden": 16, "heads": 2}, "max_steps": 2, **fast}},
        {"quantize": {"method": "int8-dynamic"}},
    ]
    spec = tiny_spec(steps=steps, model={"path": str(tmp_path / "ckpt")})
    del spec["model"]["init"]
    auto = {"latency_repeats": 1, "generate_tokens": 2, "max_batches": 4}
    folder = tmp_path / "job"
    JobFile(spec=spec, dry_run=False, device="cpu", cache_dir=str(shared_cache),
            extra={"auto_evaluate": auto}).write(folder)  # fmt: skip
    assert runner.main(["run", str(folder)]) == 0, capsys.readouterr().err
    results = json.loads((folder / "results.json").read_text())
    ctx = make_ctx(spec)
    ev = EvaluateStep(**auto)
    recorded = [(s["kind"], s["output"], s["metrics"]) for s in results["steps"]]
    assert [k for k, _, _ in recorded] == ["train", "prune", "distill", "quantize"]
    assert recorded[0][2]["upcast"]["from"] == ["bfloat16"]
    assert recorded[3][2]["float_dtype_after"] == "float32"  # the student trained in fp32
    for kind, output, metrics in recorded:
        again = AutoModelForCausalLM.from_pretrained(output)
        loss = eval_loss(again, ctx.corpus, ev.batch_size, ev.max_batches, CPU)[0]
        assert loss == pytest.approx(metrics["eval_loss"], rel=1e-5), kind
        assert is_tied(again), kind


def test_every_matrix_family_is_marked_checked():
    assert {kind for kind, _, _ in FAMILIES.values()} <= families.CHECKED


# --------------------------------------------------------------------------- figures


def figures() -> None:  # pragma: no cover - a report, run by hand
    """Print int8 sizes, parameter counts and losses per family, and CPU forward latency of
    int8-dynamic (torchao) against fp32 and torch.ao's dynamic int8 (the earlier engine):
    ``.venv/bin/python tests/steps/test_families.py``."""
    import copy
    import tempfile
    import time

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = Corpus(torch.randint(0, VOCAB, (3000,), generator=g), seq_len=16, eval_fraction=0.2)
    root = Path(tempfile.mkdtemp())
    print(f"{'family':12} {'method':12} {'disk ratio':>10} {'params':>13} {'loss parent':>11} "
          f"{'quantized':>9} {'reloaded':>9}")  # fmt: skip
    for name, (kind, fields, dtype) in FAMILIES.items():
        torch.manual_seed(0)
        config = AutoConfig.for_model(kind, vocab_size=VOCAB, **fields)
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(root / name)
        for method in ("int8-dynamic", "int8-weight"):
            model = load_model(root / name)
            base, n_before = loss_of(model, data), count_params(model)
            ctx = make_ctx(root / f"{name}-{method}", {"quantize": {"method": method}}, data)
            out = quantize.run(ctx, ctx.step, model).model
            folder = save_model(out, root / f"{name}-{method}" / "model")
            again = AutoModelForCausalLM.from_pretrained(folder)
            ratio = model_size_bytes(folder) / model_size_bytes(root / name)
            print(f"{name:12} {method:12} {ratio:10.3f} {n_before:6d}->{count_params(again):6d} "
                  f"{base:11.4f} {loss_of(out, data):9.4f} {loss_of(again, data):9.4f}")  # fmt: skip

    def ms(model: torch.nn.Module, x: torch.Tensor) -> float:
        with torch.no_grad():
            for _ in range(3):
                model(x)
            t = time.perf_counter()
            for _ in range(20):
                model(x)
        return (time.perf_counter() - t) / 20 * 1000

    print("\nforward of one 128-token sequence, 1 thread (ms)")
    for hidden, layers in ((128, 2), (256, 2), (256, 4), (512, 4)):
        config = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, intermediate_size=3 * hidden)  # fmt: skip
        torch.manual_seed(0)
        fp32 = AutoModelForCausalLM.from_config(config).eval()
        x = torch.randint(0, 4096, (1, 128))
        ao = quantize.quantize_model(copy.deepcopy(fp32), "int8-dynamic")
        old = quantize._legacy_quantize(copy.deepcopy(fp32), "int8-dynamic", 128, CPU)
        print(f"{layers} x {hidden}: fp32 {ms(fp32, x):6.2f}  int8-dynamic (torchao) {ms(ao, x):6.2f}  "
              f"torch.ao dynamic (before) {ms(old, x):6.2f}")  # fmt: skip


if __name__ == "__main__":
    figures()
