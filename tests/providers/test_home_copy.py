"""Copying an on-demand cluster's job folder home: a real shell and a real tar play the head node."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from optjob.providers.home_copy import COPY_FAILED_FILE, copy_home


class Node:
    """Stands for ``ssh <cluster> CMD``: runs CMD in a real ``sh`` whose HOME is a folder here (so
    ``~/optjob-job`` is a real folder), its stdout into the file the copier gives. ``ssh_fails`` answers
    the first N ssh calls the way OpenSSH does when the host is unknown (exit 255)."""

    def __init__(self, home: Path, cluster: str, ssh_fails: int = 0, status_rc: int = 0) -> None:
        self.home, self.cluster, self.ssh_fails, self.status_rc = home, cluster, ssh_fails, status_rc
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], out: BinaryIO) -> tuple[int, str]:
        self.calls.append(list(argv))
        if argv[0] == "sky":
            return self.status_rc, "" if self.status_rc == 0 else f"Cluster {argv[-1]} not found."
        assert argv[0] == "ssh" and argv[-2] == self.cluster
        if self.ssh_fails:
            self.ssh_fails -= 1
            return 255, f"ssh: Could not resolve hostname {self.cluster}: Name or service not known"
        done = subprocess.run(["sh", "-c", argv[-1]], stdout=out, stderr=subprocess.PIPE,
                              env={"HOME": str(self.home), "PATH": "/usr/bin:/bin"})
        return done.returncode, done.stderr.decode()


def node_with_outputs(tmp_path: Path) -> Path:
    job = tmp_path / "node" / "optjob-job"
    (job / "steps" / "00-train" / "model").mkdir(parents=True)
    (job / "steps" / "00-train" / "model" / "model.safetensors").write_bytes(b"weights")
    (job / "steps" / "00-train" / "checkpoints" / "step-10").mkdir(parents=True)
    (job / "steps" / "00-train" / "checkpoints" / "step-10" / "state.pt").write_bytes(b"big")
    (job / "results.json").write_text('{"steps": []}')
    (job / "job.json").write_text("from home")
    return tmp_path / "node"


def test_the_job_folder_comes_home_without_checkpoints_or_job_json(tmp_path):
    node = Node(node_with_outputs(tmp_path), "optjob-demo")
    home = tmp_path / "jobs" / "demo"
    home.mkdir(parents=True)
    (home / "job.json").write_text("the manager's own")
    result = copy_home("optjob-demo", home, run=node)
    assert result.copied, result.detail
    assert (home / "results.json").read_text() == '{"steps": []}'
    assert (home / "steps" / "00-train" / "model" / "model.safetensors").read_bytes() == b"weights"
    assert not (home / "steps" / "00-train" / "checkpoints").exists()
    assert (home / "job.json").read_text() == "the manager's own"
    assert node.calls[0] == ["sky", "status", "optjob-demo"]  # the SSH host entry is written first
    assert sorted(p.name for p in home.iterdir()) == ["job.json", "results.json", "steps"]  # no temp file left


def test_a_flaky_link_is_retried_and_a_dead_one_is_written_down(tmp_path):
    home = tmp_path / "jobs" / "demo"
    flaky = Node(node_with_outputs(tmp_path), "optjob-demo", ssh_fails=2)
    assert copy_home("optjob-demo", home, run=flaky, tries=3).copied
    dead = Node(tmp_path / "node", "optjob-demo", ssh_fails=5)
    result = copy_home("optjob-demo", tmp_path / "other", run=dead, tries=3)
    assert not result.copied
    assert "exit 255" in result.detail and "Could not resolve hostname" in result.detail
    assert "tar -xzf - -C" in result.detail  # the command to do it by hand
    assert (tmp_path / "other" / COPY_FAILED_FILE).read_text().startswith("outputs not copied home")


def test_a_node_without_the_folder_or_a_cluster_sky_does_not_know_is_a_failure_not_a_crash(tmp_path):
    empty = Node(tmp_path / "empty-home", "optjob-demo")
    (tmp_path / "empty-home").mkdir()
    result = copy_home("optjob-demo", tmp_path / "a", run=empty, tries=1)
    assert not result.copied and "exit 2" in result.detail  # tar: Cannot chdir
    unknown = Node(tmp_path / "empty-home", "optjob-demo", status_rc=1)
    result = copy_home("optjob-demo", tmp_path / "b", run=unknown)
    assert not result.copied and "not found" in result.detail
    assert len(unknown.calls) == 1  # no ssh to a cluster SkyPilot does not know


def test_an_archive_that_reaches_out_of_the_job_folder_is_refused(tmp_path):
    import io
    import tarfile

    def hostile(argv: Sequence[str], out: BinaryIO) -> tuple[int, str]:
        if argv[0] == "ssh":
            with tarfile.open(fileobj=out, mode="w|gz") as tar:
                info = tarfile.TarInfo("../escaped.txt")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"bad"))
        return 0, ""

    result = copy_home("optjob-demo", tmp_path / "home", run=hostile, tries=1)
    assert not result.copied and "unreadable archive" in result.detail
    assert not (tmp_path / "escaped.txt").exists()
