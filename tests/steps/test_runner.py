"""``python -m optjob.steps run JOB_DIR`` end to end: events, files, resume, stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from optjob.specs import JobSpec
from optjob.specs.data import DataSpec
from optjob.specs.errors import StepError
from optjob.steps import runner
from optjob.steps.data import load_text
from optjob.steps.dry_run import proxy_spec
from optjob.steps.events import parse_event
from optjob.steps.layout import JobFile, step_dir

pytestmark = pytest.mark.slow
Spec = Callable[..., dict[str, Any]]


@pytest.fixture
def job_dir(tmp_path: Path, shared_cache: Path) -> Callable[..., Path]:
    load_text(DataSpec(), shared_cache)  # build the corpus here, not in the subprocess

    def make(spec: dict[str, Any], dry_run: bool = False, name: str = "job") -> Path:
        folder = tmp_path / name
        quick = {"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 4}}
        JobFile(spec=spec, dry_run=dry_run, device="cpu", cache_dir=str(shared_cache),
                extra={} if dry_run else quick).write(folder)  # fmt: skip
        return folder

    return make


def parse_events(text: str) -> list[dict[str, Any]]:
    """The events, less the console's phase and dry-run check events (tests/manager/test_console_phases.py)."""
    return [e for e in map(parse_event, text.splitlines()) if e is not None and e["event"] not in ("phase", "check")]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTJOB_")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run(folder: Path, **env: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([sys.executable, "-m", "optjob.steps", "run", str(folder)],
                          capture_output=True, text=True, env=_env(**env), timeout=240)  # fmt: skip
    return proc.returncode, parse_events(proc.stdout), proc.stderr


def _main(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, Any]]]:
    code = runner.main(["run", str(folder)])
    return code, parse_events(capsys.readouterr().out)


def test_run_writes_everything_and_rerun_skips(
    job_dir: Callable[..., Path], tiny_spec: Spec, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    folder = job_dir(tiny_spec())
    code, events, err = _run(folder, OPTJOB_ATTEMPT="1")
    assert code == 0, err
    kinds = [e["event"] for e in events]
    assert kinds[0] == "step_started" and kinds[-1] == "job_done"
    assert kinds.count("progress") == 2 and kinds.count("checkpoint") == 2  # steps 10, 20; 8, 16
    first_done = kinds.index("step_done")
    assert kinds[first_done + 1 :] == ["step_started", "metrics", "step_done", "job_done"]
    started = [e for e in events if e["event"] == "step_started"]
    assert [(e["index"], e["kind"], e["total"]) for e in started] == [(0, "train", 2), (1, "evaluate", 2)]
    done = [e for e in events if e["event"] == "step_done"]
    train_out = str(step_dir(folder, 0, "train") / "model")
    assert [d["output"] for d in done] == [train_out, train_out]  # evaluate passes the model on
    assert not any(d["skipped"] for d in done)

    results = json.loads((folder / "results.json").read_text())
    assert results["name"] == "tiny" and results["attempt"] == 1
    assert [s["kind"] for s in results["steps"]] == ["train", "evaluate"]
    assert results["final"] == results["steps"][1]["metrics"]
    assert results["final"]["eval_loss"] < results["baseline"]["eval_loss"] - 0.3
    assert len(results["steps"][0]["extra"]["loss_curve"]) == 20
    done_json = json.loads((step_dir(folder, 0, "train") / "done.json").read_text())
    assert done_json["metrics"]["steps"] == 20 and done_json["output"] == train_out
    assert (step_dir(folder, 1, "evaluate") / "done.json").exists()
    assert not (step_dir(folder, 1, "evaluate") / "model").exists()
    assert AutoModelForCausalLM.from_pretrained(train_out).config.num_hidden_layers == 2

    monkeypatch.setenv("OPTJOB_ATTEMPT", "2")
    code, events = _main(folder, capsys)  # in-process: as the CLI, without a second start-up
    assert code == 0
    assert [e["event"] for e in events] == ["step_started", "step_done"] * 2 + ["job_done"]
    assert all(e["skipped"] for e in events if e["event"] == "step_done")
    again = json.loads((folder / "results.json").read_text())
    assert again["attempt"] == 2 and again["baseline"] == results["baseline"]
    assert again["steps"][0]["metrics"] == results["steps"][0]["metrics"]


def test_sigterm_checkpoints_then_rerun_resumes(
    job_dir: Callable[..., Path], tiny_spec: Spec, capsys: pytest.CaptureFixture[str],
    restore_signals: None,
) -> None:  # fmt: skip
    steps = [{"train": {"max_steps": 150, "lr": 3e-3, "log_every": 1, "checkpoint_every": 1000}}]
    folder = job_dir(tiny_spec(steps=steps))
    cmd = [sys.executable, "-m", "optjob.steps", "run", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if '"progress"' in line and json.loads(line)["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    events = parse_events("".join(seen) + out)
    assert proc.returncode == 143, err
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    assert stopped["reason"] == "signal" and stopped["index"] == 0 and 3 <= stopped["step"] < 150
    (saved,) = [e for e in events if e["event"] == "checkpoint"]
    assert saved["step"] == stopped["step"] and Path(saved["path"]).is_dir()
    assert not any(e["event"] in ("error", "step_done") for e in events)

    code = runner.main(["run", str(folder)])
    out, err = capsys.readouterr()
    events = parse_events(out)
    assert code == 0, err
    assert f"(step {stopped['step']})" in err and "resuming from" in err
    progress = [e["step"] for e in events if e["event"] == "progress"]
    assert progress[0] == stopped["step"] + 1 and progress[-1] == 150
    results = json.loads((folder / "results.json").read_text())
    assert results["steps"][0]["metrics"]["steps"] == 150
    assert len(results["steps"][0]["extra"]["loss_curve"]) == 150
    assert "final" in results and "baseline" in results


def test_deadline_in_the_past_exits_4(
    job_dir: Callable[..., Path], tiny_spec: Spec, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    folder = job_dir(tiny_spec())
    monkeypatch.setenv("OPTJOB_DEADLINE", str(time.time() - 10))
    code, events = _main(folder, capsys)
    assert code == 4
    assert [e["event"] for e in events] == ["stopped"] and events[0]["reason"] == "deadline"


def test_deadline_near_stops_training_with_a_checkpoint(
    job_dir: Callable[..., Path], tiny_spec: Spec, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    steps = [{"train": {"max_steps": 100_000, "checkpoint_every": 100_000, "log_every": 50}}]
    folder = job_dir(tiny_spec(steps=steps))
    runner.main(["run", str(job_dir(tiny_spec(steps=[{"evaluate": None}]), name="warm"))])
    capsys.readouterr()
    monkeypatch.setenv("OPTJOB_DEADLINE_MARGIN", "30")
    monkeypatch.setenv("OPTJOB_DEADLINE", str(time.time() + 34))  # trips in ~4 s
    code, events = _main(folder, capsys)
    assert code == 4
    stopped = events[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "deadline"
    if stopped["step"] is not None:  # (a very slow machine stops before training starts)
        assert stopped["index"] == 0 and 0 < stopped["step"] < 100_000
        ckpts = step_dir(folder, 0, "train") / "checkpoints"
        assert (ckpts / f"step-{stopped['step']:06d}" / "manifest.json").exists()


def test_dry_run_shrinks_everything(
    job_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str], restore_signals: None
) -> None:
    spec = {
        "name": "big",
        "model": {"init": {"layers": 12, "hidden": 1024, "heads": 16, "vocab": 32000}},
        "data": {"seq_len": 1024},
        "steps": [{"train": {"max_steps": 100_000, "batch_size": 64, "eval_every": 500}},
                  {"evaluate": {"latency_repeats": 50}}],
    }  # fmt: skip
    folder = job_dir(spec, dry_run=True)
    t = time.perf_counter()
    code, events = _main(folder, capsys)
    assert code == 0 and events[-1]["event"] == "job_done"
    assert time.perf_counter() - t < 60
    results = json.loads((folder / "results.json").read_text())
    assert results["dry_run"] is True and results["steps"][0]["metrics"]["steps"] == 5
    config = json.loads((step_dir(folder, 0, "train") / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert config["vocab_size"] <= 512


def test_the_last_steps_output_is_measured_once_not_again_as_final(
    job_dir: Callable[..., Path], tiny_spec: Spec, capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    """A pipeline that ends with a train step: its automatic evaluation is the final one (the runner
    evaluated the same model twice, which the plan never priced)."""
    folder = job_dir(tiny_spec(steps=[{"train": {"max_steps": 4, "batch_size": 4}}]))
    code = runner.main(["run", str(folder)])
    events = [e for e in map(parse_event, capsys.readouterr().out.splitlines()) if e is not None]
    assert code == 0
    phases = [e["phase"] for e in events if e["event"] == "phase" and e["state"] == "start"]
    assert "final" not in phases and phases.count("step_eval") == 1
    results = json.loads((folder / "results.json").read_text())
    assert results["final"]["eval_loss"] == results["steps"][0]["metrics"]["eval_loss"]
    assert "steps" not in results["final"]  # the evaluation's figures, not the training's


def test_proxy_spec_keeps_every_step_valid() -> None:
    spec = JobSpec.model_validate({
        "name": "p",
        "model": {"init": {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 2, "vocab": 8000}},
        "data": {"seq_len": 512},
        "steps": [
            {"hpo": {"trials": 20, "trial_steps": 100, "space": {"train.lr": {"log_uniform": [1e-4, 1e-2]}}}},
            {"train": {"max_steps": 1000, "warmup_steps": 100, "eval_every": 100}},
            {"prune": {"method": "structured", "mlp_fraction": 0.5, "heads_fraction": 0.5,
                       "recover_steps": 100}},
            {"distill": {"student": {"layers": 4, "intermediate": 512}, "max_steps": 500}},
            {"quantize": {"method": "int4-weight", "group_size": 128}},
            {"evaluate": None},
        ],
    })  # fmt: skip
    proxy = proxy_spec(spec)
    init = proxy.model.init
    assert init is not None and (init.layers, init.hidden, init.heads, init.kv_heads) == (2, 64, 2, 1)
    assert init.vocab == 512 and proxy.data.seq_len == 64 and proxy.data.max_chars == 200_000
    hpo, train, prune, distill, quantize, evaluate = proxy.pipeline
    assert (hpo.trials, hpo.trial_steps) == (2, 3)  # type: ignore[attr-defined]
    assert (train.max_steps, train.warmup_steps, train.eval_every) == (5, 5, 2)  # type: ignore[attr-defined]
    assert prune.recover_steps == 5  # type: ignore[attr-defined]
    assert distill.max_steps == 5 and distill.student.layers == 1  # type: ignore[attr-defined]
    assert distill.student.intermediate == 64  # type: ignore[attr-defined]
    assert quantize.group_size == 32 and evaluate.max_batches == 2  # type: ignore[attr-defined]
    # int4-weight needs CUDA: rehearsed as 4-bit round-to-nearest, which runs on a CPU
    assert (quantize.method, quantize.bits) == ("rtn", 4)  # type: ignore[attr-defined]


def test_proxy_spec_shrinks_every_variant_of_a_compare() -> None:
    """The dry run of a ``compare:`` makes each variant's steps small too (it used to skip them: GPTQ's
    group of 128 could not split the 64-wide stand-in, the student kept its full size)."""
    spec = JobSpec.model_validate({
        "name": "p",
        "model": {"init": {"layers": 8, "hidden": 512, "heads": 8, "vocab": 8000}},
        "steps": [
            {"train": {"max_steps": 1000}},
            {"compare": {"gptq": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 128}}],
                         "small": [{"distill": {"student": {"layers": 4}, "max_steps": 500}},
                                   {"evaluate": None}]}},
        ],
    })  # fmt: skip
    variants = proxy_spec(spec).variants
    assert variants["gptq"][0].group_size == 32  # type: ignore[attr-defined]
    distill, evaluate = variants["small"]
    assert distill.max_steps == 5 and distill.student.layers == 1  # type: ignore[attr-defined]
    assert evaluate.max_batches == 2  # type: ignore[attr-defined]


def test_bad_job_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_signals: None
) -> None:
    JobFile(spec={"name": "x", "steps": []}).write(tmp_path)
    code, events = _main(tmp_path, capsys)
    assert code == 2 and events[0]["event"] == "error" and "bad job file" in events[0]["message"]
    code, events = _main(tmp_path / "nowhere", capsys)
    assert code == 2 and events[0]["event"] == "error"


def test_failure_emits_an_error_event_and_exits_1(
    job_dir: Callable[..., Path], tiny_spec: Spec, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    folder = job_dir(tiny_spec(data={"source": str(tmp_path / "missing.txt")}))
    code, events = _main(folder, capsys)
    assert code == 1
    (error,) = events
    assert error["event"] == "error" and error["error_type"] == "StepError"
    assert "does not exist" in error["message"]


def test_preflight_fails_before_any_step(
    job_dir: Callable[..., Path], tiny_spec: Spec, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    with pytest.raises(StepError, match="not implemented"):
        runner.step_module("no_such_kind")

    def refuse(step: Any, device: Any) -> None:
        raise StepError("int4-weight needs a CUDA GPU")

    fake = types.ModuleType("optjob.steps.quantize")
    fake.run = lambda ctx, step, model: None  # type: ignore[attr-defined]
    fake.preflight = refuse  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optjob.steps.quantize", fake)
    steps = [{"train": {"max_steps": 2}}, {"quantize": {"method": "int4-weight"}}]
    code, events = _main(job_dir(tiny_spec(steps=steps)), capsys)
    assert code == 1 and [e["event"] for e in events] == ["error"]
    assert "CUDA" in events[0]["message"]
