"""Evaluation metrics, and models built, saved and loaded."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import EvaluateStep
from optjob.specs.model import ModelInit
from optjob.steps.evaluate import eval_loss, evaluate_model, run
from optjob.steps.modeling import (
    build_model,
    count_params,
    load_model,
    model_size_bytes,
    nonzero_params,
    save_model,
)


def test_metrics_present_and_sane(tiny_model: Any, make_ctx: Any, tiny_spec: Any) -> None:
    _, model = tiny_model
    ctx = make_ctx(tiny_spec(), index=1)  # the tiny spec's evaluate step
    step = EvaluateStep(metrics=["perplexity", "accuracy", "latency", "size", "memory"],
                        max_batches=4, latency_repeats=2, generate_tokens=4)  # fmt: skip
    out = run(ctx, step, model)
    m = out.metrics
    assert out.model is model
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert abs(m["eval_loss"] - math.log(512)) < 0.5  # untrained: about uniform
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["latency_ms"] > 0 and m["gen_latency_ms"] > 0 and m["gen_tokens_per_s"] > 0
    assert m["latency_ms_iqr"] >= 0 and m["gen_latency_ms_iqr"] >= 0
    assert m["params"] == count_params(model) > 100_000
    assert 0 < m["nonzero_params"] <= m["params"]
    assert m["size_bytes"] > 0 and m["peak_mem_bytes"] > 0
    (event,) = [e for e in ctx.events() if e["event"] == "metrics"]
    assert event["metrics"] == pytest.approx(m) and event["kind"] == "evaluate"


def test_only_what_is_asked(tiny_model: Any) -> None:
    ctx, model = tiny_model
    m = evaluate_model(ctx, model, EvaluateStep(metrics=["size"]))
    assert "eval_loss" not in m and "latency_ms" not in m and m["params"] > 0


def test_eval_loss_is_deterministic_and_token_weighted(tiny_model: Any) -> None:
    ctx, model = tiny_model
    a = eval_loss(model, ctx.corpus, 8, 3, ctx.device)
    b = eval_loss(model, ctx.corpus, 8, 3, ctx.device)
    assert a == b
    full = eval_loss(model, ctx.corpus, 5, None, ctx.device)
    assert full == pytest.approx(eval_loss(model, ctx.corpus, 16, None, ctx.device), rel=1e-5)


def test_save_load_round_trip(tiny_model: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx, model = tiny_model
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :5] = 0.0  # some zeros to count
    path = save_model(model, tmp_path / "m", ctx.tokenizer)
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    size = model_size_bytes(path)
    assert 0 < size < sum(p.stat().st_size for p in path.iterdir())  # tokenizer left out
    loaded = load_model(path, ctx.device)
    before = evaluate_model(ctx, model, EvaluateStep(metrics=["perplexity", "size"], max_batches=4))
    after = evaluate_model(ctx, loaded, EvaluateStep(metrics=["perplexity", "size"], max_batches=4),
                           model_dir=path)  # fmt: skip
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-6)
    assert after["nonzero_params"] == nonzero_params(model) < count_params(model)
    assert after["size_bytes"] == size
    # plain transformers can read it, tokenizer included
    assert AutoModelForCausalLM.from_pretrained(path) is not None
    assert AutoTokenizer.from_pretrained(path).decode([65, 66]) == ctx.tokenizer.decode([65, 66])
    # saving again swaps the folder whole
    save_model(loaded, path, ctx.tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_quantized_folders_load_through_quantize(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("optjob.steps.quantize")
    def load_quantized(path: Path, device: Any) -> str:
        seen.append((path, device))
        return "quantized"

    fake.load_quantized = load_quantized  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optjob.steps.quantize", fake)
    (tmp_path / "optjob_quant.json").write_text(json.dumps({"method": "int8-weight"}))
    assert load_model(tmp_path, "cpu") == "quantized" and seen == [(tmp_path, "cpu")]


def test_models_that_save_themselves(tmp_path: Path) -> None:
    class Custom(torch.nn.Module):
        def optjob_save(self, folder: Path) -> None:
            (Path(folder) / "optjob_quant.json").write_text("{}")

    path = save_model(Custom(), tmp_path / "q")
    assert (path / "optjob_quant.json").exists() and model_size_bytes(path) == 2


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_build_every_family(family: str) -> None:
    init = ModelInit(family=family, layers=2, hidden=64, heads=4, kv_heads=2 if family != "gpt2" else None,
                     intermediate=96, vocab=300, activation="gelu", dropout=0.1, tie_embeddings=True,
                     max_position=128)  # type: ignore[arg-type]  # fmt: skip
    a = build_model(init, 300, seed=3)
    b = build_model(init, 300, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    cfg = a.config
    assert cfg.vocab_size == 300 and cfg.tie_word_embeddings
    assert cfg.model_type == family
    assert a.get_input_embeddings().weight is a.get_output_embeddings().weight
    if family != "gpt2":
        assert cfg.num_key_value_heads == 2 and cfg.intermediate_size == 96 and cfg.hidden_act == "gelu"
        assert cfg.attention_dropout == 0.1
    out = a(input_ids=torch.randint(0, 300, (2, 10))).logits
    assert out.shape == (2, 10, 300)


def test_latency_median_times_fast_calls_longer_and_slow_ones_only_as_asked() -> None:
    from optjob.steps.evaluate import MAX_REPEAT_FACTOR, _timed_ms

    calls = []
    _timed_ms(lambda: calls.append(1), 3, torch.device("cpu"))  # instant: runs until the cap
    assert len(calls) == 2 + 3 * MAX_REPEAT_FACTOR
    calls.clear()
    _timed_ms(lambda: (calls.append(1), time.sleep(0.1)), 2, torch.device("cpu"))  # 2 x 0.1 s is enough
    assert len(calls) == 2 + 2


def test_latency_spread_is_the_median_and_the_interquartile_range() -> None:
    from optjob.steps.evaluate import spread

    assert spread([5.0]) == (5.0, 0.0)
    # quartiles (inclusive method) of 1..9 are 3 and 7; an outlier moves neither the median nor the IQR
    assert spread([float(x) for x in range(1, 10)]) == (5.0, 4.0)
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 900.0]) == (5.0, 4.0)
    assert spread([2.0, 1.0, 4.0, 3.0]) == (2.5, 1.5)


def test_perplexity_of_chat_data_counts_only_the_completion_tokens(tiny_model: Any) -> None:
    """Prompt tokens are a fixed, predictable run (one token repeated); completions random. Before, the
    evaluate step counted every target; now only the masked-in ones, as training does."""
    from optjob.steps.data import IGNORE_INDEX, Corpus, MaskedCorpus

    ctx, model = tiny_model
    g = torch.Generator().manual_seed(0)
    ids, mask = [], []
    for _ in range(120):
        ids += [7] * 12 + torch.randint(20, 500, (6,), generator=g).tolist()
        mask += [False] * 12 + [True] * 6
    masked = MaskedCorpus(torch.tensor(ids), torch.tensor(mask), 32, 0.3)
    with torch.no_grad():  # teach the model the prompt token: predicting 7 after 7 becomes easy
        model.lm_head.weight[7] = 3 * model.model.embed_tokens.weight[7]
    loss, acc = eval_loss(model, masked, 4, None, ctx.device)
    total, count, hits = 0.0, 0, 0
    with torch.no_grad():
        for batch, labels in zip(masked.eval_batches(4), masked.eval_labels(4), strict=True):
            logits = model(input_ids=batch[:, :-1]).logits
            keep = labels != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
            hits += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    assert count > 0 and loss == pytest.approx(total / count, rel=1e-5) and acc == hits / count
    everything, _ = eval_loss(model, Corpus(torch.tensor(ids), 32, 0.3), 4, None, ctx.device)
    assert everything < loss - 0.5  # the predictable prompt tokens pulled the old figure down
    ctx.corpus = masked
    measured = evaluate_model(ctx, model, EvaluateStep(metrics=["perplexity"]))
    assert measured["eval_loss"] == pytest.approx(loss) and measured["perplexity"] == pytest.approx(math.exp(loss))
