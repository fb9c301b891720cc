"""quantize: every CPU method shrinks the state dict, keeps perplexity, and survives
save_model -> load_model; int4-weight and int8-dynamic are refused where they cannot run."""

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
    assert (saved / quantize.RECIPE_FILE).exists() == (method not in quantize.CASTS)
    again = load_model(saved, CPU)
    assert ppl(again, corpus) == pytest.approx(got, rel=1e-6)
    assert quantize.state_dict_bytes(again) == m["size_bytes_after"]
    if method in quantize.CASTS:
        assert next(again.parameters()).dtype == quantize.CASTS[method]
    else:  # a reloaded quantized model can be saved again
        again2 = load_model(save_model(again, tmp_path / "model2"), CPU)
        assert ppl(again2, corpus) == pytest.approx(got, rel=1e-6)


def test_int4_needs_cuda():
    with pytest.raises(StepError, match="int4-weight needs a CUDA GPU"):
        quantize.preflight(QuantizeStep(method="int4-weight"), CPU)


def test_int8_dynamic_is_cpu_only():
    with pytest.raises(StepError, match="CPU only"):
        quantize.preflight(QuantizeStep(method="int8-dynamic"), torch.device("cuda"))


def test_recipe_records_versions(tmp_path, corpus):
    model = build_model(ModelInit(**INIT), 512, seed=0)
    ctx = make_ctx(tmp_path, "int8-weight", corpus)
    out = quantize.run(ctx, ctx.step, model)
    recipe = out.model.optjob_quant
    assert recipe["method"] == "int8-weight"
    assert recipe["versions"]["torch"] and recipe["versions"]["torchao"]
    assert recipe["base_config"]["hidden_size"] == 64
