"""One-shot LLM compression: Wanda, SparseGPT, GPTQ and RTN against reference computations on
tiny layers, N:M masks, the layer-by-layer calibration pass, and the steps' outputs reloading
with plain ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import JobSpec, PruneStep, QuantizeStep
from optjob.specs.errors import StepError
from optjob.specs.model import ModelInit
from optjob.steps import calibration, gptq, masks, prune, quantize, sparsegpt, structure, wanda
from optjob.steps.context import StepContext, StopFlag
from optjob.steps.data import Corpus
from optjob.steps.events import Emitter
from optjob.steps.modeling import build_model, save_model
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

INIT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 512}
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- a known layer


def correlated_inputs(n: int = 1024, d: int = 256, seed: int = 0) -> torch.Tensor:
    """Calibration inputs whose features are correlated and unevenly scaled (as in an LLM,
    where a few features are large): ``H = X^T X`` is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.rand(d, generator=g) * 3 + 0.1
    return (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scale


def layer(out: int = 48, d: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed))


def hessian(x: torch.Tensor) -> torch.Tensor:
    stat = calibration.Hessian(x.shape[1], CPU)
    stat.add(x)
    return stat.matrix()


def output_error(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    """``||W X - W' X||`` (X as rows)."""
    return float(torch.linalg.norm(x @ (w - new).t()))


def assert_nm(mask: torch.Tensor, n: int = 2, m: int = 4) -> None:
    """Exactly ``n`` pruned in every group of ``m`` consecutive inputs of every row."""
    per_group = mask.reshape(mask.shape[0], -1, m).sum(-1)
    assert torch.all(per_group == n), per_group.unique()


# --------------------------------------------------------------------------- masks and Wanda


def test_row_and_nm_masks_count_exactly() -> None:
    scores = torch.rand(10, 32)
    assert torch.all(masks.row_mask(scores, 0.5).sum(1) == 16)
    assert torch.all(masks.row_mask(scores, 0.3).sum(1) == int(32 * 0.3))
    assert_nm(masks.nm_mask(scores, 2, 4))
    assert_nm(masks.nm_mask(scores, 4, 8), 4, 8)
    assert masks.parse_pattern("unstructured") is None and masks.parse_pattern("2:4") == (2, 4)
    with pytest.raises(StepError, match="N:M"):
        masks.parse_pattern("half")


def _wanda_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float, group: int | None) -> torch.Tensor:
    """Brute force, element by element: the score is |W_ij| * sqrt(sum_t X_tj^2); per output
    row prune the lowest int(in * sparsity) (or the 2 lowest of each ``group`` of 4)."""
    out, d = w.shape
    norms = [sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5 for j in range(d)]
    mask = torch.zeros(out, d, dtype=torch.bool)
    for i in range(out):
        cols = range(d) if group is None else None
        spans = [list(cols)] if cols is not None else [list(range(s, s + group)) for s in range(0, d, group)]
        for span in spans:
            ranked = sorted(span, key=lambda j: abs(float(w[i, j])) * norms[j])
            k = int(d * sparsity) if group is None else 2
            for j in ranked[:k]:
                mask[i, j] = True
    return mask


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_mask_equals_brute_force(pattern: str) -> None:
    x = correlated_inputs(n=64, d=32)
    w = layer(out=12, d=32)
    got = wanda.prune_weight(w, x.norm(dim=0), 0.5, pattern)
    expected = _wanda_reference(w, x, 0.5, None if pattern == "unstructured" else 4)
    assert torch.equal(got, expected)
    if pattern == "2:4":
        assert_nm(got)
    # the activations matter: magnitude alone picks other weights
    assert not torch.equal(got, masks.mask_for(w.abs(), 0.5, pattern))


# --------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern: str) -> None:
    x, w = correlated_inputs(), layer()
    new, mask = sparsegpt.prune_weight(w, hessian(x), 0.5, pattern, block=32)
    assert torch.all(new[mask] == 0) and int(mask.sum()) == w.numel() // 2
    if pattern == "2:4":
        assert_nm(mask)
        assert_nm(new == 0)
    magnitude = w.masked_fill(masks.mask_for(w.abs(), 0.5, pattern), 0)
    wanda_w = w.masked_fill(wanda.prune_weight(w, x.norm(dim=0), 0.5, pattern), 0)
    err = output_error(w, new, x)
    assert err < 0.9 * output_error(w, magnitude, x)
    assert err < output_error(w, wanda_w, x)
    assert not torch.equal(new[~mask], w[~mask])  # the kept weights were updated


def test_sparsegpt_with_a_diagonal_hessian_is_blockwise_magnitude() -> None:
    """With uncorrelated, equally scaled inputs OBS has nothing to redistribute: each block's
    mask is its smallest |w| and the kept weights do not move."""
    w = layer(out=8, d=64)
    new, mask = sparsegpt.prune_weight(w, torch.eye(64) * 3.0, 0.5, block=16)
    for start in range(0, 64, 16):
        block = w[:, start : start + 16]
        assert torch.equal(mask[:, start : start + 16], masks.block_mask(block.abs(), 0.5))
    assert torch.allclose(new[~mask], w[~mask], atol=1e-5)


# --------------------------------------------------------------------------- GPTQ and RTN


def test_rtn_rounds_to_the_nearest_grid_point() -> None:
    w = layer(out=6, d=64)
    q = gptq.rtn(w, 4, 32)
    deq = q.dequantize()
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    for g in range(2):
        cols = slice(32 * g, 32 * g + 32)
        s, z = q.scale[:, g : g + 1], q.zero[:, g : g + 1].float()
        points = s * (torch.arange(16).float()[None, :] - z)  # [rows, 16]
        nearest = (w[:, cols, None] - points[:, None, :]).abs().min(-1).values
        assert torch.allclose((w[:, cols] - deq[:, cols]).abs(), nearest, atol=1e-5)
        assert torch.all(points.min(1).values <= w[:, cols].min(1).values + s[:, 0] / 2 + 1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_reconstructs_better_than_rtn(bits: int) -> None:
    x, w = correlated_inputs(), layer()
    q = gptq.quantize_weight(w, hessian(x), bits, 32)
    rtn = gptq.rtn(w, bits, 32)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    assert output_error(w, q.dequantize(), x) < 0.9 * output_error(w, rtn.dequantize(), x)


def test_gptq_with_a_diagonal_hessian_is_rtn() -> None:
    w = layer(out=8, d=64)
    q = gptq.quantize_weight(w, torch.eye(64), 4, 16)
    r = gptq.rtn(w, 4, 16)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.zero, r.zero)
    assert torch.allclose(q.scale, r.scale)


def test_gptq_keeps_pruned_weights_zero() -> None:
    x, w = correlated_inputs(), layer()
    sparse, mask = sparsegpt.prune_weight(w, hessian(x), 0.5, "2:4")
    deq = gptq.quantize_weight(sparse, hessian(x), 4, 32).dequantize()
    assert torch.all(deq[mask] == 0)  # (a kept weight may also round to the grid's zero)
    assert output_error(w, deq, x) < output_error(w, gptq.rtn(sparse, 4, 32).dequantize(), x)


# --------------------------------------------------------------------------- calibration


def test_windows_are_seeded_slices_of_the_train_split() -> None:
    ids = torch.arange(1000)
    a = calibration.windows(ids, 6, 20, seed=3)
    assert a.shape == (6, 20)
    assert torch.equal(a, calibration.windows(ids, 6, 20, seed=3))
    assert not torch.equal(a, calibration.windows(ids, 6, 20, seed=4))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    with pytest.raises(StepError, match="calibration windows of 2000 tokens"):
        calibration.windows(ids, 2, 2000)


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequential_pass_sees_the_models_own_activations(family: str) -> None:
    """With a compress step that changes nothing, the statistics the layer-by-layer pass
    gathers equal those of hooks on the model run normally: inputs, attention mask and
    positions are replayed faithfully."""
    model = build_model(ModelInit(**INIT), 512).eval() if family == "llama" else _gpt2()
    ids = torch.randint(0, 300, (10, 16), generator=torch.Generator().manual_seed(0))
    _, layers = structure.decoder_layers(model)
    direct: dict[str, calibration.InputNorms] = {}
    handles = []
    for i, block in enumerate(layers):
        for proj, module in calibration.projections(block).items():
            stat = direct[f"{i}.{proj}"] = calibration.InputNorms(calibration.in_features(module), CPU)
            handles.append(module.register_forward_hook(lambda m, a, o, s=stat: s.add(a[0])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    seen: dict[str, calibration.InputStat] = {}

    def compress(index: int, projs: dict[str, Any], stats: dict[str, calibration.InputStat]) -> None:
        seen.update({f"{index}.{k}": v for k, v in stats.items()})

    calibration.sequential(model, ids, lambda cols, dev: calibration.InputNorms(cols, dev), compress)
    assert set(seen) == set(direct) and len(seen) >= 8
    for key, stat in seen.items():
        assert isinstance(stat, calibration.InputNorms)
        assert stat.rows == 160
        assert torch.allclose(stat.norms(), direct[key].norms(), rtol=1e-4, atol=1e-5), key


# --------------------------------------------------------------------------- the steps


def make_corpus(n: int = 6000, seed: int = 0) -> Corpus:
    """A learnable stream: each token has two possible successors among 64."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 64, (64, 2), generator=g)
    pick = torch.randint(0, 2, (n,), generator=g).tolist()
    ids = [0]
    for i in range(1, n):
        ids.append(int(table[ids[-1], pick[i]]))
    return Corpus(torch.tensor(ids), seq_len=32, eval_fraction=0.1)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return make_corpus()


def make_ctx(tmp_path: Path, step: dict[str, Any], corpus: Corpus) -> Any:
    spec = JobSpec.model_validate({"name": "t", "model": {"init": INIT}, "steps": [step]})
    stream = io.StringIO()
    ctx = StepContext(
        spec=spec, job_dir=tmp_path, index=0, emitter=Emitter(stream), device=CPU, dry_run=False,
        corpus=corpus, tokenizer=None, stop=StopFlag(),
    )  # fmt: skip
    ctx.events = lambda: [json.loads(line) for line in stream.getvalue().splitlines()]  # type: ignore[attr-defined]
    return ctx


def logits(model: torch.nn.Module, corpus: Corpus) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=corpus.eval_ids[:64][None], use_cache=False).logits  # type: ignore[no-any-return]


def reload_plain(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Save as the runner does, load with nothing but transformers."""
    save_model(model, folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def decoder_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    name, layers = structure.decoder_layers(model)
    return {f"{name}.{i}.{k}": calibration.weight_of(m) for i, block in enumerate(layers)
            for k, m in calibration.projections(block).items()}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "pattern"),
    [("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"),
     ("magnitude", "2:4")],
)  # fmt: skip
def test_prune_step_outputs_reload(tmp_path: Path, corpus: Corpus, method: str, pattern: str) -> None:
    step = {"method": method, "pattern": pattern}
    if method != "magnitude":
        step["calibration"] = {"samples": 16}
    ctx = make_ctx(tmp_path, {"prune": step}, corpus)
    out = prune.run(ctx, ctx.step, build_model(ModelInit(**INIT), 512, seed=0))
    m = out.metrics
    assert m["method"] == method and m["pattern"] == pattern and m["target_sparsity"] == 0.5
    assert m["sparsity"] == pytest.approx(0.5, abs=1e-3)
    if method != "magnitude":
        assert m["calibration_samples"] == 16 and m["calibration_seq_len"] == 32
        progress = [e for e in ctx.events() if e["event"] == "progress"]
        assert [(e["step"], e["max_steps"]) for e in progress] == [(1, 2), (2, 2)]
    for w in decoder_weights(out.model).values():
        if pattern == "2:4":
            assert_nm(w == 0)
        elif method == "wanda":  # per output row
            assert torch.all((w == 0).sum(1) == w.shape[1] // 2)
        else:  # sparsegpt: per block of columns, so per layer
            assert int((w == 0).sum()) == w.numel() // 2
    again = reload_plain(out.model, tmp_path / "model")
    assert torch.allclose(logits(again, corpus), logits(out.model, corpus), atol=1e-5)
    assert all(torch.equal((w == 0), (decoder_weights(again)[k] == 0)) for k, w in decoder_weights(out.model).items())


def test_wanda_recovery_keeps_its_masks(tmp_path: Path, corpus: Corpus) -> None:
    ctx = make_ctx(tmp_path, {"prune": {"method": "wanda", "pattern": "2:4", "recover_steps": 3, "lr": 1e-3,
                                        "calibration": {"samples": 8}}}, corpus)  # fmt: skip
    base = build_model(ModelInit(**INIT), 512, seed=0)
    oneshot = prune.run(make_ctx(tmp_path / "a", {"prune": {"method": "wanda", "pattern": "2:4",
                                                            "calibration": {"samples": 8}}}, corpus),
                        ctx.step.model_copy(update={"recover_steps": 0}), copy.deepcopy(base)).model
    out = prune.run(ctx, ctx.step, base)
    assert out.metrics["recover_steps"] == 3
    before, after = decoder_weights(oneshot), decoder_weights(out.model)
    for name, w in after.items():
        assert torch.equal(w == 0, before[name] == 0), name
        assert_nm(w == 0)
    assert any(not torch.equal(w, before[n]) for n, w in after.items())  # the kept weights trained


@pytest.mark.parametrize(("method", "bits"), [("gptq", 4), ("rtn", 4), ("gptq", 8)])
def test_groupwise_quantize_step_saves_a_plain_loadable_model(
    tmp_path: Path, corpus: Corpus, method: str, bits: int
) -> None:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    step: dict[str, Any] = {"method": method, "bits": bits, "group_size": 32}
    if method == "gptq":
        step["calibration"] = {"samples": 16}
    ctx = make_ctx(tmp_path, {"quantize": step}, corpus)
    model = build_model(ModelInit(**INIT), 512, seed=0)
    float_weights = decoder_weights(model)
    out = quantize.run(ctx, ctx.step, model)
    m = out.metrics
    assert (m["method"], m["bits"], m["group_size"]) == (method, bits, 32)
    assert m["quantized_layers"] == 14 and 0 < m["weight_rel_error"] < (0.2 if bits == 4 else 0.02)
    assert m["size_bytes_after"] < 0.7 * m["size_bytes_before"]
    again = reload_plain(out.model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert torch.equal(logits(again, corpus), logits(out.model, corpus))
    for name, module in again.named_modules():
        if name in float_weights:
            weight = module.weight
            assert isinstance(weight, IntxUnpackedToInt8Tensor), name
            values = weight.dequantize().float().reshape(-1, 32)
            assert max(len(row.unique()) for row in values) <= 2**bits
    assert not isinstance(again.lm_head.weight, IntxUnpackedToInt8Tensor)
    # a reloaded quantized model saves and reloads again
    twice = reload_plain(again, tmp_path / "model2")
    assert torch.equal(logits(twice, corpus), logits(out.model, corpus))


def test_gptq_refuses_a_group_size_that_does_not_divide(tmp_path: Path, corpus: Corpus) -> None:
    ctx = make_ctx(tmp_path, {"quantize": {"method": "rtn", "group_size": 48}}, corpus)
    with pytest.raises(StepError, match="group_size 48 does not divide"):
        quantize.run(ctx, ctx.step, build_model(ModelInit(**INIT), 512, seed=0))


def test_one_shot_pruning_beats_magnitude_on_a_trained_model(tmp_path: Path, corpus: Corpus) -> None:
    """On a model that learned the stream, the calibrated methods lose less than magnitude at 2:4."""
    from optjob.specs import TrainStep
    from optjob.steps.evaluate import eval_loss
    from optjob.steps.train import train_loop

    ctx = make_ctx(tmp_path, {"train": {}}, corpus)
    base = build_model(ModelInit(**INIT), 512, seed=0)
    train_loop(ctx, base, TrainStep(max_steps=60, lr=3e-3, batch_size=8), emit=False, checkpoints=False)

    def loss_after(step: dict[str, Any]) -> float:
        c = make_ctx(tmp_path, {"prune": step}, corpus)
        model = prune.run(c, c.step, copy.deepcopy(base)).model
        return eval_loss(model, corpus, 8, 4, CPU)[0]

    cal = {"calibration": {"samples": 32}}
    magnitude = loss_after({"method": "magnitude", "pattern": "2:4"})
    assert loss_after({"method": "sparsegpt", "pattern": "2:4", **cal}) < magnitude
    assert loss_after({"method": "wanda", "pattern": "2:4", **cal}) < magnitude


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("options", "message"),
    [({"pattern": "2:4", "sparsity": 0.6}, "pattern 2:4 zeroes exactly 0.5"),
     ({"method": "structured", "mlp_fraction": 0.2, "pattern": "2:4"}, "not structured"),
     ({"method": "magnitude", "calibration": {"samples": 4}}, "calibration applies to wanda and sparsegpt"),
     ({"method": "wanda", "pattern": "3:4"}, "pattern")],
)  # fmt: skip
def test_prune_spec_refuses(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PruneStep.model_validate(options)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"method": "int8-weight", "bits": 8}, "bits applies to gptq and rtn"),
     ({"method": "rtn", "calibration": {"samples": 4}}, "calibration applies to gptq"),
     ({"method": "gptq", "bits": 3}, "4 or 8")],
)  # fmt: skip
def test_quantize_spec_refuses(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QuantizeStep.model_validate(options)


def test_new_options_survive_a_dump_and_reload() -> None:
    """job.json and the dry run's proxy carry every field: a re-validated dump must pass."""
    spec = JobSpec.model_validate({"name": "t", "model": {"init": INIT}, "steps": [
        {"prune": {"method": "magnitude"}}, {"prune": {"method": "sparsegpt", "pattern": "2:4"}},
        {"quantize": {"method": "int8-weight"}}]})  # fmt: skip
    again = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


# --------------------------------------------------------------------------- through the runner


@pytest.mark.slow
@pytest.mark.parametrize("dry_run", [False, True])
def test_pipeline_runs_and_every_output_reloads(
    tmp_path: Path, shared_cache: Path, tiny_spec: Any, capsys: pytest.CaptureFixture[str],
    restore_signals: None, dry_run: bool,
) -> None:  # fmt: skip
    """train -> wanda 2:4 (+ recovery) -> sparsegpt -> gptq int4 -> evaluate, by the runner: every
    step's folder loads with plain from_pretrained, and the sparsity survives quantization."""
    from optjob.specs.data import DataSpec
    from optjob.steps import runner
    from optjob.steps.data import load_text
    from optjob.steps.layout import JobFile

    load_text(DataSpec(), shared_cache)
    cal = {"samples": 8}
    spec = tiny_spec(steps=[
        {"train": {"max_steps": 10, "lr": 3e-3, "batch_size": 8}},
        {"prune": {"method": "wanda", "pattern": "2:4", "recover_steps": 2, "calibration": cal}},
        {"prune": {"method": "sparsegpt", "sparsity": 0.6, "calibration": cal}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calibration": cal}},
        {"evaluate": {"metrics": ["perplexity", "size"], "max_batches": 2}},
    ])  # fmt: skip
    folder = tmp_path / "job"
    JobFile(spec=spec, dry_run=dry_run, device="cpu", cache_dir=str(shared_cache),
            extra={"auto_evaluate": {"metrics": ["perplexity", "size"], "max_batches": 2}}).write(folder)  # fmt: skip
    assert runner.main(["run", str(folder)]) == 0, capsys.readouterr().err
    results = json.loads((folder / "results.json").read_text())
    steps = results["steps"]
    assert [s["kind"] for s in steps] == ["train", "prune", "prune", "quantize", "evaluate"]
    assert steps[1]["metrics"]["pattern"] == "2:4" and steps[1]["metrics"]["recover_steps"] == 2
    assert steps[2]["metrics"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert steps[3]["metrics"]["bits"] == 4 and steps[3]["metrics"]["calibration_samples"] == 8
    assert steps[4]["metrics"]["sparsity"] > 0.3  # zeros kept through gptq (counted over every parameter)
    for s in steps[:4]:
        model = AutoModelForCausalLM.from_pretrained(s["output"])
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_report_labels_the_pattern_and_the_bits() -> None:
    from optjob.manager.report.data import pick

    assert pick({"method": "wanda", "pattern": "2:4"})["method"] == "wanda 2:4"
    assert pick({"method": "sparsegpt", "pattern": "unstructured"})["method"] == "sparsegpt"
    assert pick({"method": "gptq", "bits": 4, "group_size": 128})["method"] == "gptq int4 g128"
    assert pick({"method": "int8-dynamic"})["method"] == "int8-dynamic"
