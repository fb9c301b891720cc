"""The local provider: the workload as a subprocess on this machine.

Each attempt runs ``python -m optjob.steps run JOB_DIR`` in its own process
group, wrapped in a tiny shell that records the workload's exit status in
``logs/attempt-N.exit`` — so the status survives the manager (a restarted
manager, or ``optjob status`` in another terminal, still learns how it ended).

Identity. A pid is not an identity: once an attempt has ended, its pid (and its process group id)
may belong to anyone. Every attempt gets a tag, ``OPTJOB_ATTEMPT_ID``, in the environment of the
wrapper and so of everything it starts; a process belongs to the attempt only if it carries the
tag (read from ``/proc/PID/environ``), or is the wrapper itself with the start time recorded in the
handle (``/proc/PID/stat``). Nothing else is ever signalled, and once the exit file exists the
attempt's pid is never used again. Where there is no ``/proc`` (macOS), and for handles written
before tags, the old pid / process-group checks apply, still only while no exit file exists.

Launch in two phases. The attempt's identity (its tag) is written to ``logs/attempt-N.handle.json``
before the process is started, and the full handle after; a manager killed in between leaves
enough for ``adopt`` to find the attempt by its tag. The wrapper and the workload hold an
exclusive lock on ``JOB_DIR/.optjob.lock`` (``flock``) for as long as either runs, and ``launch``
takes it first: two attempts never write one job folder.

The exit record's space is reserved at launch (``attempt-N.exit.tmp``, a fixed-size placeholder
the wrapper overwrites in place, then renames), so a disk that fills up during the run does not
also erase how the run ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from optjob.specs.errors import ProviderError, TeardownError
from optjob.steps.exit_codes import KILLED_CODES, STOP_CODES
from optjob.steps.layout import log_path, write_json_atomic

from .base import AttemptState, Handle, LaunchRequest, Poll, Provider

#: How often ``wait`` looks for the exit file.
WAIT_STEP_S = 0.02
#: The environment variable that tags every process of an attempt.
TAG_VAR = "OPTJOB_ATTEMPT_ID"
#: Held (flock) by the running attempt's wrapper and workload; ``launch`` takes it first.
LOCK_FILE = ".optjob.lock"
#: The exit record, reserved at launch: the wrapper overwrites these bytes in place (no new block).
EXIT_PLACEHOLDER = b"-" + b" " * 14 + b"\n"
#: Free space below which a failure to write is put down to a full disk.
LOW_DISK_BYTES = 1 << 20
PROC = Path("/proc")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user's counts; a zombie child of ours does not)."""
    if pid <= 1 or not _signal_ok(os.kill, pid):
        return False
    try:  # a zombie child of ours counts as dead; reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs."""
    return pgid > 1 and _signal_ok(os.killpg, pgid)


def _signal_ok(send: Callable[[int, int], None], target: int) -> bool:
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, process group, start time in clock ticks since boot)`` of ``pid`` from
    ``/proc/PID/stat``; None when there is no such process (or no ``/proc``)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    rest = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return rest[0], int(rest[2]), int(rest[19])
    except (IndexError, ValueError):
        return None


def _tagged(pid: int, tag: str) -> bool:
    """Whether process ``pid`` was started with ``OPTJOB_ATTEMPT_ID=tag`` in its environment."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or another user's: not ours
        return False
    return f"{TAG_VAR}={tag}".encode() in environ.split(b"\0")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def disk_note(path: Path) -> str:
    """``"; disk full: N bytes free on the filesystem of PATH"`` when it is (nearly) full, else ``""``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f"; disk full: {free:,} bytes free on the filesystem of {path}" if free < LOW_DISK_BYTES else ""


class LocalProvider(Provider):
    """Runs attempts on this machine. ``python`` is the interpreter for the workload."""

    name: ClassVar[str] = "local"
    #: The "resources" are this machine's process: nothing costs once it has exited.
    bills_until_teardown: ClassVar[bool] = False
    #: How long ``launch`` waits for the job folder's lock while the previous attempt's wrapper,
    #: whose exit is recorded, finishes exiting.
    lock_wait_s: float = 10.0

    def __init__(self, python: str | None = None, device: str = "auto") -> None:
        self.python = python or sys.executable
        self.device = device

    # ---- files of an attempt --------------------------------------------------------------------

    def _exit_file(self, job_dir: Path, attempt: int) -> Path:
        return log_path(job_dir, attempt).with_suffix(".exit")

    def _handle_file(self, job_dir: Path, attempt: int) -> Path:
        return log_path(job_dir, attempt).with_suffix(".handle.json")

    def _ended(self, handle: Handle) -> bool:
        return self._exit_file(Path(handle.data["job_dir"]), handle.attempt).exists()

    # ---- launch ---------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Handle:
        job_dir = request.job_dir
        try:
            log = log_path(job_dir, request.attempt)
            log.parent.mkdir(parents=True, exist_ok=True)
            lock = self._take_lock(job_dir, request.attempt)
        except OSError as exc:
            raise ProviderError(f"could not start the workload: {exc}{disk_note(job_dir)}") from None
        try:
            return self._start(request, log, lock)
        except OSError as exc:  # raised before the process started (after it, nothing raises)
            with contextlib.suppress(OSError):
                self._handle_file(job_dir, request.attempt).unlink(missing_ok=True)  # nothing to adopt
            raise ProviderError(f"could not start the workload: {exc}{disk_note(job_dir)}") from None
        finally:
            os.close(lock)  # the wrapper and the workload hold it now (or nobody does)

    def _take_lock(self, job_dir: Path, attempt: int) -> int:
        """Take the job folder's lock, or raise ``ProviderError`` naming the attempt that holds it."""
        fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                number = int(holder[1]) if len(holder) > 1 and holder[1].isdigit() else None
                # An attempt whose exit is recorded is only finishing its exit: wait for it, briefly.
                ending = number is not None and self._exit_file(job_dir, number).exists()
                if not ending or time.monotonic() >= deadline:
                    os.close(fd)
                    who = f"attempt {number}" if number is not None else "another workload"
                    raise ProviderError(
                        f"{who} of this job still runs in {job_dir} (it holds {job_dir / LOCK_FILE}); "
                        f"not starting attempt {attempt} beside it",
                        hint="`optjob status` shows it; `optjob down NAME` stops it") from None
                time.sleep(0.02)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"attempt {attempt}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _start(self, request: LaunchRequest, log: Path, lock: int) -> Handle:
        job_dir, attempt = request.job_dir, request.attempt
        tag = f"{attempt}-{uuid.uuid4().hex}"
        data: dict[str, Any] = {"pid": None, "pgid": None, "job_dir": str(job_dir), "started": time.time(),
                                "tag": tag, "start_ticks": None}
        # Phase 1: the attempt's identity is on disk before anything runs.
        handle_file = self._handle_file(job_dir, attempt)
        write_json_atomic(handle_file, Handle(self.name, "localhost", attempt, data).to_json())
        exit_file = self._exit_file(job_dir, attempt)
        exit_file.unlink(missing_ok=True)
        tmp = exit_file.with_name(exit_file.name + ".tmp")
        tmp.write_bytes(EXIT_PLACEHOLDER)  # the exit record's bytes, allocated now
        argv = [self.python, "-u", "-m", "optjob.steps", "run", str(job_dir)]
        # The shell forwards TERM to the workload (once: the workload reads a second TERM as "stop now,
        # skip the checkpoint") and records how it ended, whatever happens to us: it overwrites the
        # reserved record in place (``1<>`` does not truncate), then renames it.
        script = (
            f"{shlex.join(argv)} & child=$!; sent=; "
            f"trap '[ -n \"$sent\" ] || {{ sent=1; kill -TERM $child 2>/dev/null; }}' TERM INT; "
            f"wait $child; rc=$?; while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done; "
            f"printf '%-15s\\n' $rc 1<> {shlex.quote(str(tmp))} && mv {shlex.quote(str(tmp))} "
            f"{shlex.quote(str(exit_file))}"
        )
        # The spec's ``env:`` reaches a local run as it reaches a node; ``secrets:`` are already in our
        # environment (the plan refused a missing one). The manager's own variables win over both.
        env = {**os.environ, **request.spec.env, **request.env, "PYTHONUNBUFFERED": "1", TAG_VAR: tag}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, cwd=job_dir, pass_fds=(lock,),
            )
        stat = proc_stat(proc.pid)
        data.update(pid=proc.pid, pgid=proc.pid, start_ticks=stat[2] if stat else None)
        handle = Handle(provider=self.name, cluster="localhost", attempt=attempt, data=data)
        with contextlib.suppress(OSError):  # phase 2; without it, ``adopt`` finds the process by its tag
            write_json_atomic(handle_file, handle.to_json())
        return handle

    def adopt(self, job_dir: Path, attempt: int) -> Handle | None:
        """The attempt a manager started but did not record: from ``attempt-N.handle.json``, its pid
        found by its tag when the manager died before writing it. None if it never got that far."""
        try:
            handle = Handle.from_json(json.loads(self._handle_file(job_dir, attempt).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not handle.data.get("pid") and self._identified(handle):
            leader = next((pid for pid in self._tagged_pids(handle) if (s := proc_stat(pid)) and s[1] == pid), None)
            if leader is not None:
                stat = proc_stat(leader)
                handle.data.update(pid=leader, pgid=leader, start_ticks=stat[2] if stat else None)
        return handle

    # ---- which processes are the attempt's ---------------------------------------------------------

    def _identified(self, handle: Handle) -> bool:
        """Whether processes of this attempt can be told from others (a tag, and ``/proc``)."""
        return bool(handle.data.get("tag")) and PROC.joinpath("self", "stat").exists()

    def _tagged_pids(self, handle: Handle) -> list[int]:
        tag = str(handle.data["tag"])
        pgid = handle.data.get("pgid")
        out = []
        for entry in os.listdir(PROC):
            if not entry.isdigit():
                continue
            pid = int(entry)
            stat = proc_stat(pid)
            if stat is None or stat[0] == "Z" or (pgid and stat[1] != pgid):
                continue
            if _tagged(pid, tag):
                out.append(pid)
        return out

    def _wrapper_alive(self, handle: Handle) -> bool:
        """The wrapper shell runs: its pid, started when the handle says and carrying the tag (never a
        reused pid: start times are in clock ticks, and two processes can share one)."""
        pid, ticks = handle.data.get("pid"), handle.data.get("start_ticks")
        if not pid:
            return False
        stat = proc_stat(int(pid))
        if stat is None or stat[0] == "Z":
            _reap(int(pid))
            return False
        return (ticks is None or stat[2] == ticks) and _tagged(int(pid), str(handle.data["tag"]))

    def _members(self, handle: Handle) -> list[int]:
        """Every live process of the attempt (the wrapper, the workload, what they started)."""
        members = self._tagged_pids(handle)
        pid = handle.data.get("pid")
        if pid and pid not in members and self._wrapper_alive(handle):
            members.append(int(pid))
        return members

    def _running(self, handle: Handle) -> bool:
        """The wrapper shell or anything else of the attempt still runs (a workload whose shell was
        killed on its own is still running, and must not be relaunched beside)."""
        if self._identified(handle):
            return self._wrapper_alive(handle) or bool(self._members(handle))
        if self._ended(handle):
            return False  # an untagged handle: after its exit, its pid may be anyone's
        pid, pgid = int(handle.data.get("pid") or 0), int(handle.data.get("pgid") or 0)
        return pid_alive(pid) or group_alive(pgid)

    def _signal(self, handle: Handle, sig: signal.Signals, *, spare_wrapper: bool = False) -> None:
        """Send ``sig`` to the attempt's own processes (never to a pid alone)."""
        if self._identified(handle):
            for pid in self._members(handle):
                if spare_wrapper and pid == handle.data.get("pid"):
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            return
        if self._ended(handle):
            return
        pgid = int(handle.data.get("pgid") or 0)
        if pgid > 1:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    # ---- the Provider contract ------------------------------------------------------------------

    def poll(self, handle: Handle) -> Poll:
        job_dir = Path(handle.data["job_dir"])
        exit_file = self._exit_file(job_dir, handle.attempt)
        if exit_file.exists():
            return self._ended_poll(exit_file)
        if self._running(handle):
            return Poll(AttemptState.RUNNING, nodes=1)
        if exit_file.exists():  # it ended between the two checks
            return self._ended_poll(exit_file)
        tmp = exit_file.with_name(exit_file.name + ".tmp")
        with contextlib.suppress(OSError, ValueError):
            code = int(tmp.read_text().strip())  # recorded in place, but the rename failed
            poll = self._ended_poll(tmp, code)
            note = (f"its exit status ({code}) is only in {tmp.name}: {exit_file.parent} could not be written"
                    f"{disk_note(job_dir)}")
            return Poll(poll.state, code, "; ".join(filter(None, [poll.detail, note])), ended_at=poll.ended_at)
        return Poll(AttemptState.LOST, None,
                    f"the workload's process is gone and recorded no exit status{disk_note(job_dir)}")

    def _ended_poll(self, record: Path, code: int | None = None) -> Poll:
        if code is None:
            try:
                code = int(record.read_text().strip() or "1")
            except (ValueError, OSError):
                code = 1
        try:
            ended: float | None = record.stat().st_mtime  # written as the workload exited
        except OSError:
            ended = None
        if code == 0:
            state, detail = AttemptState.SUCCEEDED, ""
        elif code in STOP_CODES:
            state, detail = AttemptState.STOPPED, ""
        elif code in KILLED_CODES:
            state, detail = AttemptState.PREEMPTED, "the workload was killed (SIGKILL)"
        else:  # a workload that failed on a full disk says so where the disk is full still
            state, detail = AttemptState.FAILED, disk_note(record.parent).lstrip("; ")
        return Poll(state, code, detail, ended_at=ended)

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
        if self._ended(handle):
            return  # it has ended: its pid may belong to someone else by now
        if self._identified(handle):
            if self._wrapper_alive(handle):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(handle.data["pid"]), signal.SIGTERM)
            else:  # the shell is gone: signal what is left of the attempt
                self._signal(handle, signal.SIGTERM)
            return
        try:
            os.kill(int(handle.data["pid"]), signal.SIGTERM)
        except ProcessLookupError:  # the shell is gone: signal what is left of the group
            self._signal(handle, signal.SIGTERM)
        except PermissionError:
            pass

    def kill(self, handle: Handle) -> None:
        """SIGKILL the workload alone, as a spot reclaim would (preemption rehearsal, and the kill after a
        stop request's grace): the wrapper records 137."""
        if self._identified(handle):
            self._signal(handle, signal.SIGKILL, spare_wrapper=True)
            return
        if self._ended(handle):
            return
        pgid = int(handle.data["pgid"])
        try:
            out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False).stdout
            for pid in map(int, out.split()):
                if pid != pgid:
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def teardown(self, handle: Handle) -> None:
        if not self._running(handle):
            return
        if not self._ended(handle):  # still running: ask for a checkpoint first
            self.stop(handle)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._running(handle):
                time.sleep(0.1)
        if self._running(handle):  # what is left of it (after its exit: only what carries its tag)
            self._signal(handle, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._running(handle):
                time.sleep(0.05)
        if self._running(handle):
            raise TeardownError(f"process group {handle.data['pgid']} is still alive after SIGKILL")

