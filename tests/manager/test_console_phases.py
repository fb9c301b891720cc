"""Honest time on the console (issue 18, item 1): the workload names each phase as it runs, the
console shows it (rows updating in place on a terminal, one line per phase start and end in a pipe),
with progress and an ETA, and `optjob status` shows a running job's phase.

The workload test runs the real runner on a tiny model in this process; the console tests feed it
events with fixed timestamps and a ManualClock, so no assertion depends on this machine's speed."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from optjob.manager.clock import ManualClock
from optjob.manager.commands.status import job_summary
from optjob.manager.job_states import JobStatus
from optjob.manager.live import LiveReporter
from optjob.manager.phases import current_phase
from optjob.manager.planner import make_plan
from optjob.manager.render import print_jobs
from optjob.manager.store import Store
from optjob.specs import loads_spec
from rich.console import Console

SPEC = "name: tiny\nmodel: {init: {}}\nsteps: [{train: {max_steps: 100}}, {quantize: {method: int8-weight}}]\n"


def ev(event: str, ts: float, **fields: Any) -> dict[str, Any]:
    return {"event": event, "ts": ts, "v": 1, **fields}


#: A job as the workload reports it: start-up, data, the baseline evaluation (batches), a training
#: step with a checkpoint and its evaluation, a quantize step (no measure of its own: the plan's ETA).
EVENTS = [
    ev("phase", 100.0, phase="starting", state="start"),
    ev("phase", 102.0, phase="starting", state="end", wall_s=2.0),
    ev("phase", 102.0, phase="data", state="start"),
    ev("phase", 110.0, phase="data", state="end", wall_s=8.0),
    ev("phase", 110.0, phase="baseline", state="start"),
    ev("phase", 111.0, phase="baseline", state="update", done=1, total=20, unit="batches"),
    ev("phase", 120.0, phase="baseline", state="update", done=5, total=20, unit="batches"),
    ev("phase", 130.0, phase="baseline", state="end", wall_s=20.0),
    ev("step_started", 130.0, index=0, kind="train", total=2),
    ev("phase", 130.0, phase="step", state="start", index=0, kind="train"),
    ev("progress", 140.0, index=0, kind="train", step=10, max_steps=100, loss=5.0, tokens=1000, tokens_per_s=100.0),
    ev("progress", 150.0, index=0, kind="train", step=20, max_steps=100, loss=4.5, tokens=2000, tokens_per_s=100.0),
    ev("phase", 150.0, phase="checkpoint", state="start", index=0, kind="train", step=20),
    ev("checkpoint", 151.0, index=0, kind="train", step=20, path="/x", seconds=1.0),
    ev("phase", 151.0, phase="checkpoint", state="end", index=0, kind="train", step=20, wall_s=1.0),
]
REST = [
    ev("phase", 230.0, phase="step", state="end", index=0, kind="train", wall_s=100.0),
    ev("phase", 230.0, phase="step_eval", state="start", index=0, kind="train"),
    ev("phase", 240.0, phase="step_eval", state="end", index=0, kind="train", wall_s=10.0),
    ev("step_done", 240.0, index=0, kind="train", wall_s=110.0, metrics={}, skipped=False),
    ev("step_started", 240.0, index=1, kind="quantize", total=2),
    ev("phase", 240.0, phase="step", state="start", index=1, kind="quantize"),
    ev("phase", 250.0, phase="step", state="end", index=1, kind="quantize", wall_s=10.0),
    ev("step_done", 260.0, index=1, kind="quantize", wall_s=20.0, metrics={}, skipped=False),
    ev("phase", 260.0, phase="final", state="start"),
    ev("phase", 270.0, phase="final", state="end", wall_s=10.0),
    ev("job_done", 270.0, results="/x/results.json", wall_s=170.0),
]


def reporter(tty: bool) -> tuple[LiveReporter, Console, ManualClock]:
    console = Console(file=io.StringIO(), force_terminal=tty, width=100, record=True, highlight=False,
                      color_system="standard" if tty else None)
    clock = ManualClock()
    plan = make_plan(loads_spec(SPEC))
    return LiveReporter(plan, console=console, clock=clock, auto_refresh=False), console, clock


def test_a_pipe_gets_one_line_per_phase_start_and_end_and_no_carriage_return() -> None:
    live, console, _ = reporter(tty=False)
    live.status("launching attempt 1 on local")
    for e in EVENTS + REST:
        live.event(e)
    live.close()
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    for label in ("starting", "preparing data", "baseline evaluation", "evaluating step 0 (train)",
                  "final evaluation"):
        assert lines.count(label) == 1, (label, out)  # its start
        assert sum(line.startswith(f"{label} done in ") for line in lines) == 1, (label, out)  # its end
    assert sum(line.startswith("step 0 train: training") for line in lines) == 2  # start (with the plan's ETA), end
    assert "step 0 train: training done in 1m40s" in lines
    assert "  checkpointing step 0 (train) at step 20" in lines
    assert any(line.startswith("step 1 quantize: quantizing (plan: ~") for line in lines), out
    # The baseline's batch updates stay off a pipe; training logs a line per logged step, with its ETA.
    assert not any("5/20" in line for line in lines)
    assert "  0:train step 20/100 loss 4.500  100 tok/s  ETA 1m20s" in lines  # 10 steps per 10 s, 80 to go
    assert "  0:train done in 110.0s" in lines  # step_done: the step's wall time with its evaluation


def test_a_terminal_shows_the_phase_under_way_its_progress_and_eta() -> None:
    live, console, clock = reporter(tty=True)
    live.status("launching attempt 1 on local")
    for e in EVENTS[:7]:  # the baseline evaluation is at 5 of 20 batches, 10 s in: 0.5 batch/s
        live.event(e)
    text = console.export_text()
    assert "baseline evaluation" in text and "5/20 batches" in text and "ETA 30s" in text
    assert "\u2713 preparing data" in text and "done in 8.0s" in text  # an ended phase stays, ticked
    clock.advance(10)  # the ETA counts down between events
    live.progress.refresh()
    assert "ETA 20s" in console.export_text()
    for e in EVENTS[7:12]:  # training: 20 of 100 steps, 10 steps per 10 s
        live.event(e)
    text = console.export_text()
    assert "step 0 train: training" in text and "20/100 steps" in text and "ETA 1m20s" in text
    assert "loss 4.500" in text
    for e in REST[:6]:  # quantize: no measure of its own, the plan's estimate
        live.event(e)
    text = console.export_text()
    assert "step 1 quantize: quantizing" in text and "(plan)" in text and "ETA ~" in text
    live.close()


def test_status_shows_a_running_jobs_phase(tmp_path: Path) -> None:
    clock = ManualClock(start=125.0)
    store = Store(tmp_path / "state.db", clock=clock)
    store.claim_job("tiny", provider="local", job_dir=str(tmp_path), spec_path=None, spec_json="{}",
                    plan_json="{}", owner_alive=lambda j: False)
    store.update_job("tiny", status=JobStatus.RUNNING)
    attempt = store.add_attempt("tiny", run=1, provider="local", hourly_usd=0.0, nodes=1, spot=False)
    store.add_events("tiny", 1, [{**e, "attempt": 1} for e in EVENTS[:7]], log_offset=10, attempt_id=attempt.id)
    job = store.job("tiny")
    assert job is not None
    row = job_summary(store, job)
    assert row["phase"]["phase"] == "baseline" and row["phase"]["done"] == 5 and row["phase"]["total"] == 20
    assert row["phase"]["eta_s"] == 25.0 and row["phase"]["eta_from"] == "measured"  # 30 s at 120, now 125
    assert row["phase_text"] == "baseline eval 5/20 ETA 25s"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        print_jobs([row], width=80)
    assert "baseline eval 5/20 ETA 25s" in console.getvalue()
    # Training: the step's position from the job row's latest progress event (as ingest keeps it).
    latest = {**EVENTS[11], "attempt": 1}
    store.add_events("tiny", 1, [{**e, "attempt": 1} for e in EVENTS[7:11]],
                     job_update={"progress_json": json.dumps(latest)})
    clock.advance(25.0)  # now 150, the progress event's time
    job = store.job("tiny")
    assert job is not None
    row = job_summary(store, job)
    assert row["phase_text"] == "0:train training 20/100 ETA 1m20s"  # 80 steps at 100 tok/s, 100 tok/step
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        print_jobs([row], width=80)
    assert "0:train training 20/100 ETA 1m20s loss 4.500" in console.getvalue()
    # Once the job ends, no phase.
    store.add_events("tiny", 1, [{**e, "attempt": 1} for e in EVENTS[7:] + REST])
    assert current_phase([e for _, e in store.events("tiny")]) is None


@pytest.fixture
def keep_signals() -> Iterator[None]:
    """The runner installs SIGTERM/SIGINT handlers; put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_workload_emits_its_phases_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, keep_signals: None) -> None:
    import torch
    from optjob.steps import runner
    from optjob.steps.events import parse_event
    from optjob.steps.layout import JobFile

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i % 13}." for i in range(6000)))
    spec = {"name": "tiny", "model": {"init": {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64,
                                               "vocab": 300}},
            "data": {"source": str(text), "seq_len": 16},
            "steps": [{"train": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 2}}]}
    folder = tmp_path / "job"
    JobFile(spec=spec, dry_run=False, device="cpu", cache_dir=str(tmp_path / "cache"),
            extra={"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 2, "max_batches": 3}}).write(folder)
    threads = torch.get_num_threads()
    try:
        assert runner.main(["run", str(folder)]) == 0
    finally:
        torch.set_num_threads(threads)
    events = [e for e in map(parse_event, capsys.readouterr().out.splitlines()) if e is not None]
    marks = [(e["phase"], e["state"], e.get("index")) if e["event"] == "phase" else (e["event"],)
             for e in events if e["event"] in ("phase", "step_done", "job_done") and e.get("state") != "update"]
    top = [m for m in marks if m[0] not in ("checkpoint",)]
    assert top == [("starting", "start", None), ("starting", "end", None), ("data", "start", None),
                   ("data", "end", None), ("baseline", "start", None), ("baseline", "end", None),
                   ("step", "start", 0), ("step", "end", 0), ("step_eval", "start", 0), ("step_eval", "end", 0),
                   ("step_done",), ("job_done",)]  # no "final": the last step's evaluation is the final one
    # A checkpoint's write is a phase inside the step's, ended before the next one starts.
    assert marks.count(("checkpoint", "start", 0)) == marks.count(("checkpoint", "end", 0)) >= 1
    inside = marks[marks.index(("step", "start", 0)):marks.index(("step", "end", 0))]
    assert ("checkpoint", "start", 0) in inside
    # The baseline evaluation reports its batches (the first and the last at least).
    updates = [e for e in events if e["event"] == "phase" and e["phase"] == "baseline" and e["state"] == "update"
               and e.get("unit") == "batches"]
    assert updates[0]["done"] == 1 and updates[-1]["done"] == updates[-1]["total"] == 3


def test_a_workload_that_names_no_phases_still_shows_its_steps() -> None:
    """An older node (or a compare variant's steps) sends progress and step_done only: the step's phase
    is implied by its progress and ended by its step_done."""
    live, console, _ = reporter(tty=True)
    live.event(ev("step_started", 10.0, index=0, kind="train", total=1))
    live.event(ev("progress", 20.0, index=0, kind="train", step=10, max_steps=100, loss=5.0, tokens=1000,
                  tokens_per_s=100.0))
    text = console.export_text()
    assert "step 0 train: training" in text and "10/100 steps" in text and "ETA 1m30s" in text
    live.event(ev("step_done", 30.0, index=0, kind="train", wall_s=12.5, metrics={}, skipped=False))
    text = console.export_text()
    assert "\u2713 step 0 train: training" in text and "done in 12.5s" in text
    assert live.tracker.current is None
    live.close()
