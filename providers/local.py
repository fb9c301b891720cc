"""The local provider: the workload as a subprocess on this machine.

Each attempt runs ``python -m optjob.steps run JOB_DIR`` in its own process
group, wrapped in a tiny shell that records the workload's exit status in
``logs/attempt-N.exit`` — so the status survives the manager (a restarted
manager, or ``optjob status`` in another terminal, still learns how it ended).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from optjob.specs.errors import ProviderError, TeardownError
from optjob.steps.exit_codes import KILLED_CODES, STOP_CODES
from optjob.steps.layout import log_path

from .base import AttemptState, Handle, LaunchRequest, Poll, Provider

#: How often ``wait`` looks for the exit file.
WAIT_STEP_S = 0.02


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user's counts; a zombie child of ours does not)."""
    if not _signal_ok(os.kill, pid):
        return False
    try:  # a zombie child of ours counts as dead; reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs."""
    return _signal_ok(os.killpg, pgid)


def _signal_ok(send: Callable[[int, int], None], target: int) -> bool:
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalProvider(Provider):
    """Runs attempts on this machine. ``python`` is the interpreter for the workload."""

    name: ClassVar[str] = "local"
    #: The "resources" are this machine's process: nothing costs once it has exited.
    bills_until_teardown: ClassVar[bool] = False

    def __init__(self, python: str | None = None, device: str = "auto") -> None:
        self.python = python or sys.executable
        self.device = device

    def _exit_file(self, job_dir: Path, attempt: int) -> Path:
        return log_path(job_dir, attempt).with_suffix(".exit")

    def launch(self, request: LaunchRequest) -> Handle:
        log = log_path(request.job_dir, request.attempt)
        log.parent.mkdir(parents=True, exist_ok=True)
        exit_file = self._exit_file(request.job_dir, request.attempt)
        exit_file.unlink(missing_ok=True)
        argv = [self.python, "-u", "-m", "optjob.steps", "run", str(request.job_dir)]
        # The shell forwards TERM to the workload (once: the workload reads a second TERM as "stop now,
        # skip the checkpoint") and records how it ended, whatever happens to us.
        script = (
            f"{shlex.join(argv)} & child=$!; sent=; "
            f"trap '[ -n \"$sent\" ] || {{ sent=1; kill -TERM $child 2>/dev/null; }}' TERM INT; "
            f"wait $child; rc=$?; while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done; "
            f"echo $rc > {shlex.quote(str(exit_file))}.tmp && mv {shlex.quote(str(exit_file))}.tmp "
            f"{shlex.quote(str(exit_file))}"
        )
        env = {**os.environ, **request.env, "PYTHONUNBUFFERED": "1"}
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", script], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, cwd=request.job_dir,
                )
        except OSError as exc:
            raise ProviderError(f"could not start the workload: {exc}") from None
        return Handle(
            provider=self.name, cluster="localhost", attempt=request.attempt,
            data={"pid": proc.pid, "pgid": proc.pid, "job_dir": str(request.job_dir), "started": time.time()},
        )

    def poll(self, handle: Handle) -> Poll:
        job_dir = Path(handle.data["job_dir"])
        exit_file = self._exit_file(job_dir, handle.attempt)
        if exit_file.exists():
            try:
                code = int(exit_file.read_text().strip() or "1")
                ended = exit_file.stat().st_mtime  # written as the workload exited
            except (ValueError, OSError):
                code, ended = 1, None
            if code == 0:
                state, detail = AttemptState.SUCCEEDED, ""
            elif code in STOP_CODES:
                state, detail = AttemptState.STOPPED, ""
            elif code in KILLED_CODES:
                state, detail = AttemptState.PREEMPTED, "the workload was killed (SIGKILL)"
            else:
                state, detail = AttemptState.FAILED, ""
            return Poll(state, code, detail, ended_at=ended)
        if self._running(handle):
            return Poll(AttemptState.RUNNING, nodes=1)
        if exit_file.exists():  # it ended between the two checks
            return self.poll(handle)
        return Poll(AttemptState.LOST, None, "the workload's process is gone and recorded no exit status")

    def wait(self, handle: Handle, timeout_s: float) -> None:
        """Sleep until the exit file appears (checked every 20 ms: one ``stat``) or ``timeout_s`` passes."""
        exit_file = self._exit_file(Path(handle.data["job_dir"]), handle.attempt)
        deadline = time.monotonic() + timeout_s
        while not exit_file.exists() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(WAIT_STEP_S, left))

    def read_log(self, handle: Handle, offset: int) -> tuple[str, int]:
        log = log_path(Path(handle.data["job_dir"]), handle.attempt)
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read(4 << 20)
        except FileNotFoundError:
            return "", offset
        end = chunk.rfind(b"\n") + 1  # hold back a partial last line
        return chunk[:end].decode("utf-8", "replace"), offset + end

    def stop(self, handle: Handle) -> None:
        """One SIGTERM to the wrapper shell, which forwards exactly one to the workload. Signalling the
        whole group would deliver two (the shell forwards too), and a second TERM skips the checkpoint."""
        if self._exit_file(Path(handle.data["job_dir"]), handle.attempt).exists():
            return  # it has ended: its pid may belong to someone else by now
        try:
            os.kill(int(handle.data["pid"]), signal.SIGTERM)
        except ProcessLookupError:  # the shell is gone: signal what is left of the group
            self._signal(handle, signal.SIGTERM)
        except PermissionError:
            pass

    def kill(self, handle: Handle) -> None:
        """SIGKILL the workload alone, as a spot reclaim would (used by preemption rehearsal)."""
        pgid = int(handle.data["pgid"])
        try:
            out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False).stdout
            for pid in map(int, out.split()):
                if pid != pgid:
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def _signal(self, handle: Handle, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(handle.data["pgid"]), sig)

    def _running(self, handle: Handle) -> bool:
        """The wrapper shell or anything else in the attempt's process group still runs (a workload
        whose shell was killed on its own is still running, and must not be relaunched beside)."""
        return pid_alive(int(handle.data["pid"])) or group_alive(int(handle.data["pgid"]))

    def teardown(self, handle: Handle) -> None:
        if not self._running(handle):
            return
        self.stop(handle)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._running(handle):
            time.sleep(0.1)
        if self._running(handle):
            self._signal(handle, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._running(handle):
                time.sleep(0.05)
        if self._running(handle):
            raise TeardownError(f"process group {handle.data['pgid']} is still alive after SIGKILL")
