"""quantize: every CPU method shrinks the state dict, keeps perplexity, and survives
save_model -> load_model as an ordinary checkpoint (quantized ones with their
quantization_config); int4-weight and int8-dynamic are refused where they cannot run."""

from __future__ import annotations

import io

import pytest
import torch
from optjob.specs import JobSpec, QuantizeStep
from optjob.specs.errors import StepError
from optjob.specs.model import ModelInit
from optjob.steps import quantize
from optjob.steps.context import StepContext, StopFlag
from optjob.steps.data import Corpus
from optjob.steps.evaluate import eval_loss, perplexity
from optjob.steps.events import Emitter
from optjob.steps.modeling import build_model, load_model, save_model

INIT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 512}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    return Corpus(torch.randint(0, 512, (4000,), generator=g), seq_len=32, eval_fraction=0.2)


def make_ctx(tmp_path, method: str, corpus: Corpus) -> StepContext:
    spec = JobSpec.model_validate(
        {"name": "t", "model": {"init": INIT}, "steps": [{"quantize": {"method": method}}]}
    )
    return StepContext(
        spec=spec, job_dir=tmp_path, index=0, emitter=Emitter(io.StringIO()), device=CPU,
        dry_run=False, corpus=corpus, tokenizer=None, stop=StopFlag(),
    )


def ppl(model: torch.nn.Module, corpus: Corpus) -> float:
    return perplexity(eval_loss(model, corpus, 8, 4, CPU)[0])


@pytest.mark.parametrize("method", quantize.CPU_METHODS)
def test_cpu_method_round_trip(tmp_path, corpus, method):
    model = build_model(ModelInit(**INIT), 512, seed=0)
    base = ppl(model, corpus)
    ctx = make_ctx(tmp_path, method, corpus)
    quantize.preflight(ctx.step, CPU)
    out = quantize.run(ctx, ctx.step, model)
    m = out.metrics
    assert m["method"] == method
    assert m["size_bytes_after"] < m["size_bytes_before"]
    if method.startswith("int8"):
        assert m["size_ratio"] <= 0.5
    got = ppl(out.model, corpus)
    assert got == pytest.approx(base, rel=0.01)
    saved = save_model(out.model, tmp_path / "model")
    assert not (saved / quantize.RECIPE_FILE).exists()
    assert ("quantization_config" in (saved / "config.json").read_text()) == (method not in quantize.CASTS)
    again = load_model(saved, CPU)
    assert ppl(again, corpus) == pytest.approx(got, rel=1e-6)
    assert quantize.state_dict_bytes(again) == pytest.approx(m["size_bytes_after"], rel=0.01)
    if method in quantize.CASTS:
        assert next(again.parameters()).dtype == quantize.CASTS[method]
    else:  # a reloaded quantized model can be saved again
        again2 = load_model(save_model(again, tmp_path / "model2"), CPU)
        assert ppl(again2, corpus) == pytest.approx(got, rel=1e-6)


def test_int4_needs_cuda():
    with pytest.raises(StepError, match="int4-weight needs a CUDA GPU"):
        quantize.preflight(QuantizeStep(method="int4-weight"), CPU)


def test_int8_dynamic_runs_on_cpu_and_cuda_only():
    quantize.preflight(QuantizeStep(method="int8-dynamic"), torch.device("cuda"))
    with pytest.raises(StepError, match="CPU and CUDA"):
        quantize.preflight(QuantizeStep(method="int8-dynamic"), torch.device("mps"))


def test_recipe_records_versions(tmp_path, corpus):
    model = build_model(ModelInit(**INIT), 512, seed=0)
    ctx = make_ctx(tmp_path, "int8-weight", corpus)
    out = quantize.run(ctx, ctx.step, model)
    recipe = out.model.optjob_quant
    assert recipe["method"] == "int8-weight"
    assert recipe["versions"]["torch"] and recipe["versions"]["torchao"]
    assert recipe["base_config"]["hidden_size"] == 64


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight"])
def test_earlier_format_still_loads(tmp_path, corpus, method):
    """Folders written before quantized outputs became plain checkpoints (optjob_quant.json
    + quantized_state.pt) still load, e.g. a finished step of a job being resumed."""
    model = build_model(ModelInit(**INIT), 512, seed=0).eval()
    recipe = quantize.recipe_for(model, method, 128, torch.float32)
    old = quantize.attach_saver(quantize._legacy_quantize(model, method, 128, CPU), recipe)
    saved = save_model(old, tmp_path / "model")
    assert quantize.is_quantized_dir(saved)
    assert ppl(load_model(saved, CPU), corpus) == pytest.approx(ppl(old, corpus), rel=1e-6)
