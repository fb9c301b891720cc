"""A ``compare`` step on the node: every variant starts from the same parent, each is reused on a
re-apply while unchanged, a changed one reruns alone, and a stop mid-compare resumes where it was."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from optjob.specs.data import DataSpec
from optjob.steps import runner
from optjob.steps.context import StopRequested
from optjob.steps.data import load_text
from optjob.steps.events import parse_event
from optjob.steps.layout import JobFile, kept_progress, step_dir, variant_step_dir

pytestmark = pytest.mark.slow
Spec = Callable[..., dict[str, Any]]
QUICK = {"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 2, "max_batches": 2,
                           "metrics": ["perplexity", "latency", "size"]}}


def _variants(b_sparsity: float = 0.3) -> dict[str, Any]:
    return {"a": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
            "b": [{"prune": {"method": "magnitude", "sparsity": b_sparsity}}, {"quantize": {"method": "fp16"}}]}


def _spec(tiny_spec: Spec, variants: dict[str, Any]) -> dict[str, Any]:
    return tiny_spec(steps=[{"train": {"max_steps": 3, "batch_size": 2, "checkpoint_every": 100}},
                            {"compare": variants}])


def _write(folder: Path, spec: dict[str, Any], cache: Path) -> Path:
    JobFile(spec=spec, device="cpu", cache_dir=str(cache), extra=QUICK).write(folder)
    return folder


def _digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records the digest of the model each step starts from, by (variant, variant step); ``stop_at``
    (a variant name) makes that variant's first step stop as a signal would, once."""
    from optjob.steps import prune, quantize

    seen: dict[str, Any] = {"inputs": {}, "stop_at": None}
    for module in (prune, quantize):
        original = module.run

        def run(ctx: Any, step: Any, model: Any, original: Any = original) -> Any:
            where = (getattr(ctx, "variant", None), getattr(ctx, "variant_step", None))
            seen["inputs"][where] = _digest(model)
            if where[0] is not None and where[0] == seen["stop_at"]:
                seen["stop_at"] = None
                raise StopRequested("signal")
            return original(ctx, step, model)

        monkeypatch.setattr(module, "run", run)
    return seen


def _main(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, Any]]]:
    code = runner.main(["run", str(folder)])
    return code, [e for e in map(parse_event, capsys.readouterr().out.splitlines()) if e is not None]


def _done(events: list[dict[str, Any]]) -> dict[tuple[Any, Any], bool]:
    """{(variant, variant step): skipped} of the variant steps that reported step_done."""
    return {(e["variant"], e["variant_step"]): e["skipped"] for e in events
            if e["event"] == "step_done" and "variant" in e}


def test_variants_start_from_the_parent_and_are_reused_until_changed(
    tmp_path: Path, shared_cache: Path, tiny_spec: Spec, watch: dict[str, Any],
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    from optjob.steps.modeling import load_model
    from transformers import AutoModelForCausalLM

    load_text(DataSpec(), shared_cache)
    folder = _write(tmp_path / "job", _spec(tiny_spec, _variants()), shared_cache)
    code, events = _main(folder, capsys)
    assert code == 0
    assert _done(events) == {("a", 0): False, ("b", 0): False, ("b", 1): False}
    # the console names each variant's phases (step, then the evaluation of its output)
    phases = [(e["phase"], e.get("variant")) for e in events if e["event"] == "phase" and e["state"] == "start"
              and e["phase"] in ("step", "step_eval") and e["index"] == 1]
    assert phases == [("step", "a"), ("step_eval", "a"), ("step", "b"), ("step_eval", "b"),
                      ("step", "b"), ("step_eval", "b")]
    parent = _digest(load_model(step_dir(folder, 0, "train") / "model"))
    # variant a pruned its model in place; b still started from the parent, not from a's result
    assert watch["inputs"][("a", 0)] == parent and watch["inputs"][("b", 0)] == parent
    assert watch["inputs"][("b", 1)] != parent  # b's second step got b's pruned model

    results = json.loads((folder / "results.json").read_text())
    rows = [s for s in results["steps"] if s.get("variant")]
    assert [(r["variant"], r["variant_step"], r["kind"], r["index"]) for r in rows] == [
        ("a", 0, "prune", 1), ("b", 0, "prune", 1), ("b", 1, "quantize", 1)]
    assert "final" not in results and "variant" not in results["steps"][0]
    for r in rows:  # every output is its own folder, loadable by plain transformers
        out = Path(r["output"])
        assert out.parent == variant_step_dir(folder, 1, r["variant"], r["variant_step"], r["kind"])
        AutoModelForCausalLM.from_pretrained(out)
        assert r["metrics"]["perplexity"] > 0
    assert rows[0]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.02)

    # unchanged: nothing reruns
    watch["inputs"].clear()
    code, events = _main(folder, capsys)
    assert code == 0 and all(_done(events).values()) and not watch["inputs"]

    # b changed: b alone reruns (both its steps), a is reused
    _write(folder, _spec(tiny_spec, _variants(b_sparsity=0.4)), shared_cache)
    code, events = _main(folder, capsys)
    assert code == 0
    assert _done(events) == {("a", 0): True, ("b", 0): False, ("b", 1): False}
    assert set(watch["inputs"]) == {("b", 0), ("b", 1)} and watch["inputs"][("b", 0)] == parent
    train_done = [e for e in events if e["event"] == "step_done" and e["index"] == 0]
    assert train_done[0]["skipped"]


def test_a_stop_mid_compare_resumes_at_the_variant_it_stopped_in(
    tmp_path: Path, shared_cache: Path, tiny_spec: Spec, watch: dict[str, Any],
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    load_text(DataSpec(), shared_cache)
    folder = _write(tmp_path / "job", _spec(tiny_spec, _variants()), shared_cache)
    watch["stop_at"] = "b"
    code, events = _main(folder, capsys)
    assert code == 143
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    assert stopped["index"] == 1
    assert _done(events) == {("a", 0): False}
    assert "01-compare/a/00-prune" in (kept_progress(folder) or "")

    code, events = _main(folder, capsys)
    assert code == 0
    assert _done(events) == {("a", 0): True, ("b", 0): False, ("b", 1): False}
    steps = [e for e in events if e["event"] == "step_done"]
    assert steps[0]["index"] == 0 and steps[0]["skipped"]  # the train step is not run again


def test_a_training_step_inside_a_variant_resumes_from_its_own_checkpoint(
    tmp_path: Path, shared_cache: Path, tiny_spec: Spec, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    from optjob.steps.variants import VariantContext

    load_text(DataSpec(), shared_cache)
    distill = {"distill": {"student": {"layers": 1}, "max_steps": 6, "batch_size": 2, "log_every": 1,
                           "checkpoint_every": 100}}
    folder = _write(tmp_path / "job", _spec(tiny_spec, {"q": [{"quantize": {"method": "fp16"}}], "s": [distill]}),
                    shared_cache)
    emit = VariantContext.emit

    def stop_at_step_3(self: VariantContext, event: str, /, **fields: Any) -> dict[str, Any]:
        if event == "progress" and fields.get("step") == 3:
            self.stop.request()  # as SIGTERM would: the loop checkpoints and stops
        return emit(self, event, **fields)

    monkeypatch.setattr(VariantContext, "emit", stop_at_step_3)
    code, events = _main(folder, capsys)
    assert code == 143
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert saved and saved[-1]["variant"] == "s" and saved[-1]["index"] == 1
    assert Path(saved[-1]["path"]).parent == variant_step_dir(folder, 1, "s", 0, "distill") / "checkpoints"
    assert "checkpoint at step" in (kept_progress(folder) or "") and "01-compare/s/00-distill" in kept_progress(folder)

    monkeypatch.setattr(VariantContext, "emit", emit)
    code = runner.main(["run", str(folder)])
    out, err = capsys.readouterr()
    events = [e for e in map(parse_event, out.splitlines()) if e is not None]
    assert code == 0 and "resuming from" in err
    progress = [e["step"] for e in events if e["event"] == "progress" and e.get("variant") == "s"]
    assert progress[0] == saved[-1]["step"] + 1 and progress[-1] == 6
    assert _done(events) == {("q", 0): True, ("s", 0): False}
