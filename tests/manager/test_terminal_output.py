"""What a person reads at the terminal: tables that fit 80 columns without cutting a job's name,
statuses without stutter, a verdict that names the real problem, and a report for a job that
finished while nobody watched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.commands import common
from optjob.manager.commands import status as status_cmd
from optjob.manager.controller import Controller
from optjob.manager.plan import BudgetPlan
from optjob.manager.planner import make_plan
from optjob.manager.render import job_status_text, print_jobs, print_plan, progress_text
from optjob.manager.store import Store
from optjob.providers.base import Handle
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec


def row(name: str, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": name, "status": "running", "reason": None, "provider": "local",
                               "where": "local", "step_index": 0, "step_kind": "train", "elapsed_s": 65.0,
                               "spent_usd": 0.0123, "burn_usd_per_h": 0.0, "attempts": 1, "message": None,
                               "progress": {"event": "progress", "step": 40, "max_steps": 300, "loss": 2.5}}
    base.update(kw)
    return base


def test_the_jobs_table_fits_80_columns_and_never_cuts_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["qwen-compression-sweep-with-a-long-name", "llama-8b-qlora-on-a10g-spot"]
    rows = [row(names[0], status="stopped", reason="budget", burn_usd_per_h=36.0,
                progress={"event": "metrics", "metrics": {"perplexity": 12.345678, "eval_loss": 2.5,
                                                          "accuracy": 0.4, "latency_ms": 3.2}}),
            row(names[1], where="aws A100:8 spot")]
    print_jobs(rows, width=80)
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert all(name in out for name in names)  # `optjob logs NAME` needs the whole name
    assert "…" not in out and "stopped (budget)" in out  # no cell cut: a column goes whole or stays whole
    print_jobs(rows, width=120)
    wide = capsys.readouterr().out
    assert "ppl 12.35" in wide and "latency_ms" not in wide  # the headline result, not a raw dump
    assert "aws A100:8 spot" in wide


def test_statuses_do_not_stutter() -> None:
    assert job_status_text("succeeded", "succeeded") == "succeeded"
    assert job_status_text("failed", "failed") == "failed"
    assert job_status_text("stopped", "budget") == "stopped (budget)"
    assert progress_text(row("x", progress={"event": "progress", "step": 3, "max_steps": 9, "loss": None})) == "3/9"


def test_a_plan_over_its_hours_says_so_rather_than_over_by_zero_dollars(capsys: pytest.CaptureFixture[str]) -> None:
    spec = loads_spec("name: slow\nmodel: {init: {}}\nsteps: [{train: {}}]\nbudget: {max_hours: 0.001}\n")
    plan = make_plan(spec)
    from dataclasses import replace

    plan = replace(plan, budget=BudgetPlan(None, 0.001, fits=False, over_by_usd=0.0,
                                           reason="no offer finishes within 0.001 h"))
    print_plan(plan)
    out = capsys.readouterr().out
    assert "over by $0" not in out and "does not fit: no offer finishes within 0.001 h" in out


def test_status_writes_the_report_of_a_job_that_finished_while_detached(home: Path, standin_python: str,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STANDIN_STEPS", "3")
    provider = LocalProvider(python=standin_python)
    s = loads_spec("name: away\nmodel: {init: {}}\nsteps: [{train: {}}]\n")
    store = Store(paths.db_path())
    Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    provider.wait(Handle.from_json(store.attempts("away")[0].handle or {}), 60)
    assert not (home / "jobs" / "away" / "report.md").exists()
    monkeypatch.setattr(common, "provider_for", lambda name: provider)
    status_cmd.status_command(None, as_json=True)
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["status"] == "succeeded" and rows[0]["where"] == "local"
    assert (home / "jobs" / "away" / "report.md").exists()


LOG = "\n".join([
    '{"event": "step_started", "ts": 1, "v": 1, "index": 0, "kind": "train", "total": 2}',
    "Failed to load the _C_mxfp8 extension from torchao/_C_mxfp8.so: not built",
    "/x/site-packages/torch/foo.py:12: FutureWarning: `foo` is deprecated",
    " 40%|████      | 4/10 [00:01<00:02,  2.00it/s]",
    "resuming from /jobs/j/steps/00-train/checkpoints/step-000083 (step 83)",
    '{"event": "progress", "ts": 2, "v": 1, "index": 0, "kind": "train", "step": 84, "max_steps": 300, '
    '"loss": 2.51234, "tokens_per_s": 1234.5}',
    '{"event": "trial", "ts": 3, "v": 1, "index": 1, "number": 2, "value": 5.392975234985352, '
    '"params": {"train.lr": 0.008459126528049376}, "state": "COMPLETE"}',
])


def test_logs_read_as_text_events_rendered_and_library_noise_gone() -> None:
    from optjob.manager.commands.logs import readable

    out = readable(LOG)
    assert out.splitlines() == [
        "0:train started",
        "resuming from /jobs/j/steps/00-train/checkpoints/step-000083 (step 83)",
        "0:train step 84/300 loss 2.512 1,234 tok/s",
        "1 trial 2: 5.3930 (train.lr=0.008459) COMPLETE",
    ]


def test_logs_cli_attempt_headers_tail_and_raw_json(home: Path, standin_python: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.setenv("STANDIN_STEPS", "4")
    s = loads_spec("name: talk\nmodel: {init: {}}\nsteps: [{train: {}}]\n")
    store = Store(paths.db_path())
    Controller(store, LocalProvider(python=standin_python), tick_s=0.05).apply(make_plan(s), s)

    def logs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "optjob.manager.cli", "logs", "talk", *args],
                              capture_output=True, text=True, timeout=60)

    text = logs().stdout
    assert text.splitlines()[0].startswith("── attempt 1 (succeeded)") and "step 4/4" in text
    assert '{"event"' not in text
    raw = logs("--json").stdout
    assert raw.count('"event": "progress"') == 4 and "── attempt" not in raw
    assert logs("--tail", "1").stdout.splitlines()[-1] == "job done in 0.2s"
    missing = logs("--attempt", "7")
    assert missing.returncode == 2 and "no attempt 7" in missing.stderr
