"""How the SkyPilot provider calls SkyPilot: one retry layer per call, teardown confirmation, and
launch requests recorded before they are waited for (so a launch is idempotent per attempt).

``SkyCalls`` is the base of ``SkyPilotProvider`` (providers/skypilot.py, the cluster part and the
provider's entry points) and ``ManagedJobs`` (providers/sky_managed.py, the managed-job part).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from optjob.specs.errors import ProviderError, TeardownError
from optjob.steps.exit_codes import STOP_CODES
from optjob.steps.layout import write_json_atomic

from .base import AttemptState, Handle, Poll, Provider
from .sky_client import ControllerUnavailable, SkyClient, TransientSkyError

T = TypeVar("T")
log = logging.getLogger(__name__)


def request_file(job_dir: Path, attempt: int) -> Path:
    """Where an attempt's launch request is recorded before the manager waits for it."""
    return job_dir / "logs" / f"attempt-{attempt}.skypilot-request.json"


def read_request(job_dir: Path, attempt: int) -> dict[str, Any]:
    """The recorded launch request of an attempt: ``request_id``, ``state`` (submitted, done, failed,
    interrupted, cancelled), ``job_id`` once known, ``submitted_at`` and the ``handle`` it will get."""
    try:
        record = json.loads(request_file(job_dir, attempt).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def slice_log(text: str, offset: int) -> tuple[str, int]:
    """The complete lines of ``text`` after byte ``offset``, and the offset after them."""
    data = text.encode("utf-8", "replace")
    if len(data) <= offset:
        return "", offset
    chunk = data[offset:]
    cut = chunk.rfind(b"\n")
    if cut < 0:
        return "", offset
    return chunk[: cut + 1].decode("utf-8", "replace"), offset + cut + 1


def ended(code: int | None, detail: str, nodes: int = 0, spot: bool = False, **more: Any) -> Poll:
    """The poll of a workload that exited with ``code`` (None: not recorded)."""
    state = AttemptState.STOPPED if code in STOP_CODES else AttemptState.FAILED
    state = AttemptState.SUCCEEDED if code == 0 else state
    return Poll(state, exit_code=code, detail=detail, nodes=nodes, spot=spot, **more)


class SkyCalls(Provider):
    """The retry, confirmation and launch-request machinery (set up by ``SkyPilotProvider.__init__``)."""

    client: SkyClient
    sleep: Callable[[float], None]
    clock: Callable[[], float]
    retries: int
    backoff_s: float
    teardown_timeout_s: float
    confirm_interval_s: float

    # -- one layer of retries at this boundary ---------------------------------------------------
    def _again(self, fn: Callable[[], T]) -> T:
        """One quick second try after a blip (a poll or a log read must not wait long); a jobs controller
        that cannot be asked is a state, not a blip: it is not retried here."""
        try:
            return fn()
        except ControllerUnavailable:
            raise
        except TransientSkyError as exc:
            log.info("SkyPilot: %s; trying once more", exc)
            self.sleep(min(self.backoff_s, 1.0))
            return fn()

    def _retry(self, fn: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except TransientSkyError as exc:
                if attempt == self.retries:
                    raise
                log.info("SkyPilot: %s; retrying in %.0fs", exc, delay)
                self.sleep(delay)
                delay = min(delay * 2, 60.0)
        raise AssertionError("unreachable")

    def _confirm(self, gone: Callable[[], bool], what: str, manual: str) -> None:
        deadline = self.clock() + self.teardown_timeout_s
        while True:
            try:
                if gone():
                    return
            except TransientSkyError as exc:
                log.info("confirming teardown of %s: %s", what, exc)
            except ProviderError as exc:
                raise TeardownError(f"could not confirm {what} is gone: {exc.message}", hint=exc.hint) from exc
            if self.clock() >= deadline:
                raise TeardownError(f"SkyPilot still reports {what} after {self.teardown_timeout_s:.0f}s",
                                    hint=f"retry `optjob down`, or run `{manual}`")
            self.sleep(self.confirm_interval_s)

    def _down_confirmed(self, cluster: str) -> None:
        try:
            self._retry(lambda: self.client.down(cluster))
        except ProviderError as exc:
            raise TeardownError(f"could not tear down {cluster}: {exc.message}",
                                hint=exc.hint or f"retry `optjob down`, or `sky down {cluster}`") from exc
        self._confirm(lambda: self.client.cluster(cluster, refresh=True) is None, f"cluster {cluster}",
                      f"sky down {cluster}")

    # -- logs ------------------------------------------------------------------------------------
    def _logs(self, handle: Handle) -> str:
        job_id = handle.data.get("job_id")
        if job_id is None:
            return ""
        try:
            if handle.data.get("mode") == "managed":
                return self._again(lambda: self.client.managed_logs(int(job_id)))
            return self._again(lambda: self.client.logs(handle.cluster, int(job_id)))
        except ProviderError as exc:
            log.debug("no log for %s: %s", handle.cluster, exc)
            return ""

    # -- launch requests -------------------------------------------------------------------------
    def _submit_and_wait(self, submit: Callable[[], str], handle: Handle, out: Any) -> int:
        """Submit (or adopt this attempt's recorded request), record the request id, wait for it."""
        job_dir = Path(handle.data["job_dir"])
        record = read_request(job_dir, handle.attempt)
        if record.get("job_id") is not None and record.get("state") == "done":
            return int(record["job_id"])
        if record.get("request_id") and record.get("state") == "submitted":
            rid = str(record["request_id"])  # a launch of this attempt already went out: wait for it
        else:
            rid = submit()
            record = {"request_id": rid, "state": "submitted", "submitted_at": self.clock(),
                      "handle": Handle(self.name, handle.cluster, handle.attempt, dict(handle.data)).to_json()}
            write_json_atomic(request_file(job_dir, handle.attempt), record)
        try:
            job_id = self._retry(lambda: self.client.wait(rid, out))
        except KeyboardInterrupt:
            self._abandon(rid, handle, record)
            raise
        except TransientSkyError:
            raise
        except ProviderError:
            write_json_atomic(request_file(job_dir, handle.attempt), {**record, "state": "failed"})
            raise
        write_json_atomic(request_file(job_dir, handle.attempt), {**record, "state": "done", "job_id": job_id})
        return job_id

    def _abandon(self, rid: str, handle: Handle, record: dict[str, Any]) -> None:
        """Ctrl-C while waiting for a launch: SkyPilot's SDK leaves the request running on the API
        server, so cancel it, then remove what it made. What is recorded first (``interrupted``) lets
        ``adopt`` / ``down --orphans`` finish the job if a second Ctrl-C cuts this short."""
        path = request_file(Path(handle.data["job_dir"]), handle.attempt)
        write_json_atomic(path, {**record, "state": "interrupted"})
        try:
            self.client.cancel_request(rid)
            status = self.client.request_status(rid)
            job_id = self.client.wait(rid) if status == "SUCCEEDED" else None  # done before the cancel
            if handle.data.get("mode") != "managed" or job_id is not None:
                # A cancelled launch leaves its half-made cluster; a finished one, its job: remove them.
                self.teardown(Handle(self.name, handle.cluster, handle.attempt, {**handle.data, "job_id": job_id}))
        except ProviderError as exc:
            log.warning("cleaning up the interrupted launch of %s: %s", handle.cluster, exc)
            return
        write_json_atomic(path, {**record, "state": "cancelled", "job_id": job_id})

    # -- stop requests ---------------------------------------------------------------------------
    @staticmethod
    def _stop_file(handle: Handle) -> Path:
        return Path(handle.data["job_dir"]) / "logs" / f"attempt-{handle.attempt}.stop.json"

    def _stop_requested_at(self, handle: Handle) -> float | None:
        if "stop_requested_at" in handle.data:
            return float(handle.data["stop_requested_at"])
        try:
            return float(json.loads(self._stop_file(handle).read_text())["stop_requested_at"])
        except (KeyError, OSError, ValueError, TypeError):
            return None
