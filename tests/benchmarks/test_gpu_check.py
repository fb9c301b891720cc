"""The prepared GPU check (``benchmarks/gpu_check.py``) works before a GPU is ever lent: its CPU smoke
run goes through every check (the CUDA-only ones skipped, saying so), prints one JSON object and
writes the same to ``--out``; a check that fails or hangs is recorded without hiding the others; and
a bare checkout (optjob not installed, no packages, as on the device machine) still starts and says
what it could not import."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu import harness
from benchmarks.gpu.harness import Check, CheckFailed, Skip

ROOT = Path(__file__).resolve().parents[2]
RECORD_KEYS = {"title", "status", "figure", "unit", "goal", "met", "error", "reason", "seconds", "metrics"}
#: Checks that run on the CPU in the smoke run; the rest need CUDA.
CPU_CHECKS = {"bf16_train", "trainer_throughput", "quantize_gptq_int4", "quantize_rtn_int4"}
CUDA_CHECKS = {"memory_full_fp32", "memory_full_bf16", "memory_lora_bf16", "memory_gradient_checkpointing_bf16",
               "qlora", "quantize_int4_weight", "ddp_nccl", "fsdp_nccl"}


def _env() -> dict[str, str]:
    """This environment but for $OUT and optjob's run variables (OPTJOB_CACHE, the suite's shared
    corpus cache, kept)."""
    env = {k: v for k, v in os.environ.items() if k != "OUT" and (not k.startswith("OPTJOB_") or k == "OPTJOB_CACHE")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_cpu_smoke_runs_every_check_and_reports_one_json_object(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    written = json.loads((out / "gpu_check.json").read_text())
    assert written == printed
    assert printed["mode"] == "cpu-smoke" and set(printed["checks"]) == CPU_CHECKS | CUDA_CHECKS
    for name, record in printed["checks"].items():
        assert set(record) >= RECORD_KEYS, name
        assert record["status"] in harness.STATUSES, name
    checks = printed["checks"]
    have_accelerate = importlib.util.find_spec("accelerate") is not None
    for name in CPU_CHECKS - ({"trainer_throughput"} if not have_accelerate else set()):
        assert checks[name]["status"] == "ok", (name, checks[name]["error"], checks[name]["reason"])
    for name in CUDA_CHECKS:
        assert (checks[name]["status"], checks[name]["reason"]) == ("skipped", "no CUDA"), name
    train = checks["bf16_train"]
    assert train["figure"] > 0 and train["metrics"]["loss_last"] < train["metrics"]["loss_first"]
    if have_accelerate:
        trainer = checks["trainer_throughput"]
        assert trainer["figure"] > 0 and set(trainer["metrics"]["tokens_per_s"]) == {"optjob", "trainer"}
    else:
        assert "accelerate" in checks["trainer_throughput"]["reason"]
    for name in ("quantize_gptq_int4", "quantize_rtn_int4"):
        metrics = checks[name]["metrics"]
        assert metrics["plain_reload_ok"] and checks[name]["met"], name
        assert abs(metrics["eval_loss_reloaded"] / metrics["eval_loss_recorded"] - 1) <= 0.005
    # A skipped memory check still priced the step: the estimate side ran.
    assert checks["memory_lora_bf16"]["metrics"]["estimate_mib"] > 0
    assert printed["summary"]["failed"] == 0
    assert printed["summary"]["skipped"] == len(CUDA_CHECKS) + (0 if have_accelerate else 1)


def test_a_failing_check_is_recorded_and_the_next_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[str] = []

    def boom(out: dict[str, Any]) -> None:
        out.update(figure=1.5, unit="x")
        print("noise a library prints")
        raise CheckFailed("first line\nthe loss did not decrease")

    def missing(out: dict[str, Any]) -> None:
        raise Skip("ModuleNotFoundError: No module named 'bitsandbytes'")

    def fine(out: dict[str, Any]) -> None:
        ran.append("fine")
        out.update(figure=2.0, met=True)

    records = {c.name: harness.run_check(c, lambda: ran.append("cleanup"))
               for c in (Check("boom", "t", boom), Check("missing", "t", missing), Check("fine", "t", fine))}
    assert records["boom"]["status"] == "failed"
    assert records["boom"]["error"] == "the loss did not decrease"  # the error's last line
    assert records["boom"]["figure"] == 1.5  # what it measured before failing is kept
    assert records["boom"]["where"].startswith("tests/benchmarks/test_gpu_check.py:")
    assert (records["missing"]["status"], records["missing"]["reason"]) == (
        "skipped", "ModuleNotFoundError: No module named 'bitsandbytes'")
    assert records["fine"]["status"] == "ok" and ran == ["cleanup", "cleanup", "fine", "cleanup"]
    assert capsys.readouterr().out == ""  # a check's prints go to stderr: stdout is the JSON's
    assert harness.summary(records) == {"ok": 1, "failed": 1, "skipped": 1, "goals_missed": []}


def test_a_check_that_hangs_fails_at_its_time_limit() -> None:
    def hang(out: dict[str, Any]) -> None:
        while True:
            time.sleep(0.01)

    record = harness.run_check(Check("hang", "t", hang, timeout_s=0.2))
    assert record["status"] == "failed" and "ran past its 0.2 s limit" in record["error"]
    after = harness.run_check(Check("next", "t", lambda out: time.sleep(0.3), timeout_s=0))  # alarm disarmed
    assert after["status"] == "ok"


def test_a_bare_checkout_starts_and_says_what_it_cannot_import(tmp_path: Path) -> None:
    """``python -S``: no site-packages, so neither the installed optjob nor torch nor pydantic: the
    device machine's situation at its worst. optjob is imported through links, the missing packages are
    listed, and every check fails with the line that says why."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-S", "-m", "benchmarks.gpu_check", "--only", "bf16_train,qlora",
                           "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["optjob"].startswith("not installed: imported from")
    errors = result["environment"]["import_errors"]
    assert errors["torch"] == "ModuleNotFoundError: No module named 'torch'" and "pydantic" in errors
    assert set(result["checks"]) == {"bf16_train", "qlora"}
    for record in result["checks"].values():
        assert record["status"] == "failed" and "No module named 'torch'" in record["error"]
