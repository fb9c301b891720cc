"""The local provider against the Provider contracts (base.py), with a stand-in workload."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from optjob.providers.base import AttemptState, Handle, LaunchRequest, Poll
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec
from optjob.steps.events import parse_event

SPEC = loads_spec("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n")


def wait(provider: LocalProvider, handle: Handle, timeout: float = 30) -> Poll:
    end = time.time() + timeout
    while time.time() < end:
        poll = provider.poll(handle)
        if poll.state.is_terminal():
            return poll
        time.sleep(0.05)
    raise AssertionError("attempt did not end")


def launch(provider: LocalProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attempt: int = 1, **env: str):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return provider.launch(LaunchRequest(spec=SPEC, job_dir=tmp_path, attempt=attempt))


def events(provider: LocalProvider, handle: Handle) -> list[dict]:
    text, _ = provider.read_log(handle, 0)
    return [e for e in map(parse_event, text.splitlines()) if e]


def test_success_exit_code_and_events(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="5")
    assert p.poll(h).state in (AttemptState.RUNNING, AttemptState.SUCCEEDED)
    before = time.time()
    poll = wait(p, h)
    assert (poll.state, poll.exit_code) == (AttemptState.SUCCEEDED, 0)
    assert poll.ended_at is not None and before - 30 < poll.ended_at <= time.time()  # the exit file's time
    assert p.poll(h).ended_at == poll.ended_at  # level-based: the same end, however late the poll
    kinds = [e["event"] for e in events(p, h)]
    assert kinds == ["step_started"] + ["progress"] * 5 + ["step_done", "job_done"]


def test_wait_returns_soon_after_the_end_and_not_before(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="400", STANDIN_SLEEP="0.05")  # ~20 s unless stopped
    t = time.monotonic()
    p.wait(h, 0.3)  # still running: the whole timeout passes
    assert time.monotonic() - t >= 0.3 and not p.poll(h).state.is_terminal()
    p.stop(h)
    t = time.monotonic()
    p.wait(h, 20.0)  # it ends within a second of the stop: wait returns then, not after 20 s
    assert time.monotonic() - t < 10 and p.poll(h).state.is_terminal()


def test_read_log_offsets_give_each_byte_once(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="20", STANDIN_SLEEP="0.02")
    text, offset = "", 0
    while True:
        chunk, offset = p.read_log(h, offset)
        text += chunk
        if p.poll(h).state.is_terminal() and not p.read_log(h, offset)[0]:
            break
        time.sleep(0.01)
    full, _ = p.read_log(h, 0)
    assert text == full and text.endswith("\n")


def test_failure_is_failed_with_its_code(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="1", STANDIN_RC="3")
    poll = wait(p, h)
    assert (poll.state, poll.exit_code) == (AttemptState.FAILED, 3)


def test_stop_is_graceful(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="1000", STANDIN_SLEEP="0.05")
    time.sleep(0.5)
    p.stop(h)
    poll = wait(p, h)
    assert poll.state == AttemptState.STOPPED and poll.exit_code == 143
    assert events(p, h)[-1]["event"] == "stopped"
    p.stop(h)  # stopping an ended attempt is fine


def test_sigkill_reads_as_preemption_and_survives_a_new_manager(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="1000")
    time.sleep(0.5)
    p.kill(h)
    # A restarted manager only has the handle's JSON.
    fresh = LocalProvider(python=standin_python)
    poll = wait(fresh, Handle.from_json(h.to_json()))
    assert poll.state == AttemptState.PREEMPTED and poll.exit_code == 137


def test_teardown_kills_and_is_idempotent(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="100000")
    time.sleep(0.3)
    p.teardown(h)
    assert p.poll(h).state.is_terminal()
    p.teardown(h)


def test_deadline_env_reaches_the_workload(standin_python, tmp_path, monkeypatch):
    p = LocalProvider(python=standin_python)
    h = launch(p, tmp_path, monkeypatch, STANDIN_STEPS="1000", OPTJOB_DEADLINE=str(time.time() + 0.5))
    poll = wait(p, h)
    assert (poll.state, poll.exit_code) == (AttemptState.STOPPED, 4)
    assert events(p, h)[-1]["reason"] == "deadline"


def test_spec_env_reaches_a_local_run(standin_python, tmp_path, monkeypatch):
    """``env:`` applies to local runs as to nodes (it used to reach only SkyPilot's task)."""
    spec = loads_spec("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n"
                      "env: {TOKENIZERS_PARALLELISM: 'false'}\n")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("STANDIN_ECHO_ENV", "TOKENIZERS_PARALLELISM,OPTJOB_ATTEMPT")
    p = LocalProvider(python=standin_python)
    h = p.launch(LaunchRequest(spec=spec, job_dir=tmp_path, attempt=1, env={"OPTJOB_ATTEMPT": "1"}))
    assert wait(p, h).state is AttemptState.SUCCEEDED
    seen = json.loads((tmp_path / "standin-env.json").read_text())
    assert seen == {"TOKENIZERS_PARALLELISM": "false", "OPTJOB_ATTEMPT": "1"}
