"""prune: magnitude (masks folded, kept through recovery, reload intact) and structured
(smaller model that save_pretrained()s and reloads with identical logits)."""

from __future__ import annotations

import io

import pytest
import torch
from optjob.specs import JobSpec, PruneStep
from optjob.specs.errors import StepError
from optjob.specs.model import ModelInit
from optjob.steps import prune
from optjob.steps.context import StepContext, StopFlag
from optjob.steps.data import Corpus
from optjob.steps.evaluate import eval_loss
from optjob.steps.events import Emitter
from optjob.steps.modeling import build_model, load_model, save_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

INIT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 512}


def make_corpus(n: int = 6000, seed: int = 0) -> Corpus:
    """A learnable stream: each token has two possible successors among 64."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 64, (64, 2), generator=g)
    pick = torch.randint(0, 2, (n,), generator=g).tolist()
    ids = [0]
    for i in range(1, n):
        ids.append(int(table[ids[-1], pick[i]]))
    return Corpus(torch.tensor(ids), seq_len=32, eval_fraction=0.1)


def make_ctx(tmp_path, step: dict, corpus: Corpus | None = None) -> StepContext:
    spec = JobSpec.model_validate({"name": "t", "model": {"init": INIT}, "steps": [step]})
    return StepContext(
        spec=spec, job_dir=tmp_path, index=0, emitter=Emitter(io.StringIO()),
        device=torch.device("cpu"), dry_run=False, corpus=corpus or make_corpus(),
        tokenizer=None, stop=StopFlag(),
    )


def tiny(seed: int = 0) -> torch.nn.Module:
    return build_model(ModelInit(**INIT), 512, seed=seed)


def loss_of(model: torch.nn.Module, corpus: Corpus) -> float:
    return eval_loss(model, corpus, 8, 4, torch.device("cpu"))[0]


def test_magnitude_hits_sparsity_and_survives_reload(tmp_path):
    ctx = make_ctx(tmp_path, {"prune": {"sparsity": 0.5}})
    model = tiny()
    head_before = model.lm_head.weight.detach().clone()
    out = prune.run(ctx, ctx.step, model)
    assert out.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert out.metrics["nonzero_params"] < out.metrics["params_before"]
    assert torch.equal(out.model.lm_head.weight, head_before)  # lm_head is not pruned
    assert not any("weight_orig" in k or "weight_mask" in k for k in out.model.state_dict())
    saved = save_model(out.model, tmp_path / "model")
    again = load_model(saved)
    assert prune.linear_sparsity(again) == pytest.approx(out.metrics["sparsity"])
    assert loss_of(again, ctx.corpus) == pytest.approx(loss_of(out.model, ctx.corpus), rel=1e-6)


def test_magnitude_recovery_keeps_masks(tmp_path):
    ctx = make_ctx(tmp_path, {"prune": {"sparsity": 0.6, "recover_steps": 4, "lr": 1e-3}})
    model = tiny()
    ref = tiny()
    masks = prune.magnitude_prune(ref, 0.6)
    out = prune.run(ctx, ctx.step, model)
    assert out.metrics["recover_steps"] == 4
    assert out.metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)
    modules = dict(out.model.named_modules())
    for name, mask in masks.items():  # the same weights are zero, the kept ones moved
        w = modules[name].weight
        assert torch.all(w[~mask] == 0)
    changed = modules["model.layers.0.mlp.up_proj"].weight
    assert not torch.equal(changed, dict(ref.named_modules())["model.layers.0.mlp.up_proj"].weight)
    again = load_model(save_model(out.model, tmp_path / "model"))
    assert loss_of(again, ctx.corpus) == pytest.approx(loss_of(out.model, ctx.corpus), rel=1e-6)


def test_structured_equals_zeroing_the_removed_units():
    torch.manual_seed(0)
    model = tiny().eval()
    small = prune.shrink(model, intermediate=64, heads=2).eval()
    zeroed = tiny().eval()
    head_dim = 16
    with torch.no_grad():
        for layer, zl in zip(model.model.layers, zeroed.model.layers, strict=True):
            keep = prune._top(prune.mlp_scores(layer.mlp), 64)
            drop = torch.ones(128, dtype=torch.bool)
            drop[keep] = False
            zl.mlp.down_proj.weight[:, drop] = 0
            heads = prune._top(prune.head_scores(layer.self_attn, 4, head_dim), 2)
            for h in range(4):
                if h not in heads:
                    zl.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
    x = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(small(x).logits, zeroed(x).logits, atol=1e-5, rtol=1e-5)


def test_structured_run_saves_and_reloads_identically(tmp_path):
    ctx = make_ctx(tmp_path, {"prune": {"method": "structured", "mlp_fraction": 0.5,
                                        "heads_fraction": 0.5}})
    out = prune.run(ctx, ctx.step, tiny())
    m = out.metrics
    assert (m["intermediate_size"], m["attention_heads"], m["kv_heads"]) == (64, 2, 2)
    assert m["params_after"] < m["params_before"]
    cfg = out.model.config
    assert cfg.head_dim == 16 and cfg.hidden_size == 64
    again = load_model(save_model(out.model, tmp_path / "model")).eval()
    x = torch.randint(0, 512, (2, 32))
    assert torch.equal(again(x).logits, out.model.eval()(x).logits)


def test_structured_grouped_query_attention():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = LlamaForCausalLM(cfg).eval()
    small = prune.shrink(model, heads=2)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    assert small(torch.randint(0, 512, (1, 16))).logits.shape == (1, 16, 512)
    with pytest.raises(StepError, match="key/value heads"):
        prune.shrink(model, heads=3)


def test_structured_gpt2_cuts_mlp_neurons_not_heads():
    """gpt2's Conv1D MLP is cut like any other; its head width is hidden / heads, so
    heads are refused with a hint that fits the prune step."""
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512))
    small = prune.structured_prune(model, PruneStep(method="structured", mlp_fraction=0.5))
    assert small.config.n_inner == 128
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (64, 128)
    with pytest.raises(StepError, match="head width") as err:
        prune.structured_prune(model, PruneStep(method="structured", heads_fraction=0.5))
    assert "heads_fraction: 0" in (err.value.hint or "")
