"""``notify: {webhook: URL}``: a JSON summary POSTed to a local HTTP server (127.0.0.1, started
here) when a job ends — succeeded or stopped at its cap — once per run; a webhook that fails is one
warning line and never fails the job."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from optjob.manager import paths
from optjob.manager.commands import apply as apply_cmd
from optjob.manager.commands import common
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.notify import notify_ended
from optjob.manager.store import Store
from optjob.providers.local import LocalProvider
from optjob.specs import SpecError, loads_spec
from optjob.specs.errors import BudgetExceeded


class Hook:
    """A webhook on 127.0.0.1 that records every POST and answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                hook.bodies.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                    "json": json.loads(self.rfile.read(length))})
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def _spec_file(tmp_path: Path, url: str, extra: str = "") -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(f"name: tiny\nmodel: {{init: {{}}}}\nsteps: [{{train: {{}}}}]\nnotify: {{webhook: '{url}'}}\n{extra}")
    return p


def _apply(path: Path) -> None:
    apply_cmd.apply_command(str(path), local=True, dry_run=False, yes=True, detach=False, as_json=False)


def test_a_finished_job_posts_its_summary_once(home: Path, tmp_path: Path, hook: Hook, standin_python: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STANDIN_STEPS", "3")
    monkeypatch.setattr(common, "provider_for", lambda name: LocalProvider(python=standin_python))
    _apply(_spec_file(tmp_path, hook.url))
    out = capsys.readouterr()
    assert "tiny: succeeded, spent" in out.out and "(succeeded)" not in out.out  # apply's last line
    assert "warning" not in out.err
    (body,) = hook.bodies
    assert body["path"] == "/hooks/secret-token" and body["type"] == "application/json"
    summary = body["json"]
    assert (summary["event"], summary["name"], summary["status"], summary["reason"]) == \
        ("job_ended", "tiny", "succeeded", "succeeded")
    assert summary["text"].startswith("optjob: tiny succeeded, $") and summary["attempts"] == 1
    assert summary["report"] and summary["report"][0].endswith("report.md")
    # Once per run: a later look (status, list) does not post it again.
    store = Store(paths.db_path())
    assert notify_ended(store, "tiny") is None and len(hook.bodies) == 1
    # The node never sees the webhook (it is often a secret).
    assert "notify" not in json.loads((home / "jobs" / "tiny" / "job.json").read_text())["spec"]


def test_a_job_stopped_at_its_cap_posts_too(home: Path, tmp_path: Path, hook: Hook, standin_python: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    monkeypatch.setattr(common, "provider_for", lambda name: LocalProvider(python=standin_python))
    monkeypatch.setattr(apply_cmd, "check_feasible", lambda plan: None)  # the plan's estimate is over the cap
    with pytest.raises(BudgetExceeded):
        _apply(_spec_file(tmp_path, hook.url, "resources: {hourly_usd: 3600}\nbudget: {max_usd: 0.5}\n"))
    (body,) = hook.bodies
    assert (body["json"]["status"], body["json"]["reason"]) == ("stopped", "budget")
    assert "stopped (budget)" in body["json"]["text"] and body["json"]["max_usd"] == 0.5


def _finished(store: Store, url: str) -> None:
    store.claim_job("done", provider="local", job_dir=str(paths.job_dir("done")), spec_path=None,
                    spec_json=json.dumps({"name": "done", "notify": {"webhook": url}}), plan_json=None,
                    owner_alive=lambda j: False)
    store.update_job("done", status=JobStatus.FAILED, reason=Reason.FAILED, message="step 0 failed")


def test_a_failing_webhook_is_one_warning_and_the_job_stands(home: Path, hook: Hook,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(paths.db_path())
    _finished(store, hook.url)
    hook.status = 500
    common.notify_ended(store, "done")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: notify: could not post the summary of done to 127.0.0.1:")
    assert "secret-token" not in line  # the URL's path may be a secret: only the host is shown
    job = store.job("done")
    assert job is not None and job.status is JobStatus.FAILED
    hook.status = 204  # it went nowhere, so the next look tries again
    common.notify_ended(store, "done")
    assert len(hook.bodies) == 2 and hook.bodies[-1]["json"]["message"] == "step 0 failed"
    assert capsys.readouterr().err == ""


def test_an_unreachable_webhook_is_one_warning(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store(paths.db_path())
    _finished(store, f"http://127.0.0.1:{port}/x")
    common.notify_ended(store, "done")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: notify: could not post the summary of done to 127.0.0.1")


def test_the_webhook_must_be_an_http_url() -> None:
    with pytest.raises(SpecError) as exc:
        loads_spec("name: x\nmodel: {init: {}}\nsteps: [{train: {}}]\nnotify: {webhook: 'ftp://h/x'}\n")
    assert "notify.webhook: webhook must be an http:// or https:// URL" in exc.value.errors[0]
