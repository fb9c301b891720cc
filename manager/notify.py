"""``notify: {webhook: URL}``: a JSON summary POSTed when a job ends (succeeded, failed, stopped at
its budget cap, cancelled), once per run, by whichever command sees it end (``apply``, or ``status``
/ ``list`` for a job that ended detached).

A webhook that fails never fails the job: the caller prints one warning line (naming the host only,
as a webhook URL is often a secret). The body carries ``text``, one line a Slack (or Mattermost,
Discord ``/slack``) incoming webhook shows as it is, beside the fields a program reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .store import Store

#: The manager's record that a run's summary went out (so it goes once).
NOTIFIED = "notified"
TIMEOUT_S = 10.0


def summary(store: Store, name: str) -> dict[str, Any]:
    """What the webhook receives."""
    from .render import job_status_text
    from .report import report_data

    data = report_data(store, name)
    job = store.job(name)
    outcome = job_status_text(data["status"], data["reason"])
    est = data.get("estimated_usd")
    cap = (job.plan.get("budget") or {}).get("max_usd") if job else None
    reports = [str(f) for f in (Path(data["job_dir"]) / n for n in ("report.md", "report.html")) if f.is_file()]
    text = (f"optjob: {name} {outcome}, ${data['spent_usd']:.4f} spent"
            + (f" (estimated ${est:.4f})" if est is not None else "")
            + (f": {data['message']}" if data.get("message") and data["status"] != "succeeded" else ""))
    return {
        "event": "job_ended", "name": name, "status": data["status"], "reason": data["reason"],
        "outcome": outcome, "message": data.get("message"), "run": data.get("run"),
        "spent_usd": round(data["spent_usd"], 6), "run_spent_usd": round(data["run_spent_usd"], 6),
        "estimated_usd": est, "max_usd": cap, "attempts": len(data["attempts"]),
        "launched_at": data.get("date"), "ended_at": job.ended_at if job else None,
        "hardware": data.get("hardware"), "job_dir": data["job_dir"],
        "report": reports,
        "final": {k: v for k, v in (data.get("final") or {}).items() if v is not None},
        "text": text,
    }


def post_json(url: str, payload: dict[str, Any], timeout_s: float = TIMEOUT_S) -> None:
    """POST ``payload`` as JSON; raises ``OSError`` (``urllib.error.URLError`` is one) unless the
    server answers 2xx."""
    import urllib.request

    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "optjob"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        status = getattr(response, "status", 200)
        if not 200 <= status < 300:
            raise OSError(f"HTTP {status}")


def host_of(url: str) -> str:
    """``https://hooks.slack.com/services/T0/B0/secret`` -> ``hooks.slack.com``: what a warning may show."""
    try:
        return urlsplit(url).hostname or "the webhook"
    except ValueError:
        return "the webhook"


def notify_ended(store: Store, name: str) -> str | None:
    """POST the summary of ``name``'s run that just ended, if its spec asks for it and it has not
    gone out yet; a warning line when it could not be sent (the job stands as it is)."""
    job = store.job(name)
    if job is None or not job.status.is_terminal():
        return None
    try:
        url = _webhook(job.spec_json)
    except ValueError:
        return None
    if url is None:
        return None
    sent = store.attempt_events(name, kinds=(NOTIFIED,))
    if any(e.get("run") == job.run for _, e in sent):
        return None
    attempts = store.attempts(name, run=job.run)
    number = attempts[-1].number if attempts else 0
    try:
        payload = summary(store, name)
        post_json(url, payload)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        return f"notify: could not post the summary of {name} to {host_of(url)}: {why}"
    store.add_events(name, number, [{"event": NOTIFIED, "ts": store.clock.time(), "run": job.run,
                                     "status": payload["status"], "reason": payload["reason"]}])
    return None


def _webhook(spec_json: str) -> str | None:
    """The webhook of a stored spec, read without validating the rest (an old spec stays readable)."""
    notify = (json.loads(spec_json) or {}).get("notify") if spec_json else None
    url = notify.get("webhook") if isinstance(notify, dict) else None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None
