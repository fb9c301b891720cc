"""Bring an on-demand cluster's job folder home before teardown, for a cloud run without storage.

A cloud run with ``storage.artifacts`` keeps everything in its bucket. An on-demand run without one
keeps its outputs on the cluster's disk, which goes with the cluster; so before ``down`` the job folder
(results, final models, logs; not checkpoints, which only a bucket can carry to a new node) is copied
into the job's folder on this machine.

How the files travel: every ``sky status`` writes an SSH host entry named after the cluster (SkyPilot 0.14.1
``sky/client/cli/command.py::_get_cluster_records_and_set_ssh_config`` → ``sky/utils/cluster_utils.py::
SSHConfigHelper.add_cluster``, included from ``~/.ssh/config``; the SDK's ``launch`` does not write it, the
CLI does), so ``ssh <cluster>`` reaches the head node, as SkyPilot's docs show. The folder comes back as a
tar stream over that ssh (tar is on every image; rsync is not on every laptop), is written to a temporary
file and unpacked with tarfile's ``data`` filter (no absolute paths, no links out of the folder).

The runner is injected (``CommandRunner``): the tests run the remote command in a real shell with a real
tar against a folder standing for the node's home, and fail the way ssh does (exit 255, "Could not
resolve hostname ...").
"""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .sky_task import REMOTE_JOB_DIR

#: ``(argv, stdout file) -> (exit code, last lines of stderr)``.
CommandRunner = Callable[[Sequence[str], BinaryIO], tuple[int, str]]
#: What stays on the node: checkpoints (a new node could not use them without a bucket) and what came from home.
EXCLUDED = ("checkpoints", "./job.json")
#: Kept next to the job's files when the copy failed, so ``status``/``report`` can say what was lost.
COPY_FAILED_FILE = "copy-home-failed.txt"
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null"]


@dataclass(frozen=True)
class CopyResult:
    copied: bool
    detail: str  # one line: what was copied where, or why it was not

    def __str__(self) -> str:
        return self.detail


def run(argv: Sequence[str], out: BinaryIO) -> tuple[int, str]:
    try:
        done = subprocess.run(list(argv), stdout=out, stderr=subprocess.PIPE, text=False, timeout=3600,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:  # ssh or sky missing, or a copy that never ends
        return 127, str(e)
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return done.returncode, " | ".join(lines[-3:])


def remote_command() -> str:
    """The command the head node runs: its job folder as a gzip'd tar on stdout."""
    excludes = " ".join(f"--exclude={shlex.quote(p)}" for p in EXCLUDED)
    return f"tar -C {REMOTE_JOB_DIR} {excludes} -czf - ."


def copy_home(cluster: str, job_dir: Path, run: CommandRunner = run, tries: int = 3) -> CopyResult:
    """Copy the cluster's job folder into ``job_dir`` (files there are overwritten); ``tries`` times at
    most. Never raises: the caller tears down either way (the cluster's autostop would remove it anyway)
    and a failure is also written to ``COPY_FAILED_FILE``."""
    job_dir.mkdir(parents=True, exist_ok=True)
    code, err = run(["sky", "status", cluster], io.BytesIO())  # writes the cluster's SSH host entry
    if code != 0:
        return _failed(job_dir, f"`sky status {cluster}` failed (exit {code}): {err or 'no output'}")
    argv = [*SSH, cluster, remote_command()]
    for _ in range(max(1, tries)):
        with tempfile.TemporaryFile(dir=job_dir) as tar:
            code, err = run(argv, tar)
            if code != 0:
                continue
            tar.seek(0)
            try:
                with tarfile.open(fileobj=tar, mode="r|gz") as archive:
                    archive.extractall(job_dir, filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:  # a torn stream: try again
                code, err = -1, f"unreadable archive: {e}"
                continue
        (job_dir / COPY_FAILED_FILE).unlink(missing_ok=True)
        return CopyResult(True, f"copied the job folder home from {cluster} into {job_dir} "
                                "(checkpoints stay on the node)")
    return _failed(job_dir, f"copy from {cluster} failed (exit {code}): {err or 'no output'}; by hand: "
                            f"{shlex.join(argv)} | tar -xzf - -C {shlex.quote(str(job_dir))}")


def _failed(job_dir: Path, detail: str) -> CopyResult:
    line = f"outputs not copied home: {detail}"
    with contextlib.suppress(OSError):
        (job_dir / COPY_FAILED_FILE).write_text(line + "\n")
    return CopyResult(False, line)
