"""Checkpoints under faults: a process killed half way through a save, a corrupted newest
checkpoint, and a disk that fills up (RLIMIT_FSIZE: writes fail with EFBIG) never leave a half
file that is read; the previous checkpoint stays valid, is the one resumed from, and a failed
save says clearly what happened."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optjob.steps import checkpoint as ckpt
from optjob.steps.layout import JobFile, step_dir, write_json_atomic
from reliability_harness import wait_for

# A child that saves checkpoint 2 and blocks at a chosen point, so the parent SIGKILLs it exactly there.
SAVER = r"""
import os, sys, time, pathlib, torch
from optjob.steps import checkpoint as ckpt
root, marker, where = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]

def block():
    marker.write_text(where)
    time.sleep(120)

class BlockWhilePickled:
    def __reduce__(self):
        block()
        return (int, (0,))

parts = {"model": {"w": torch.arange(50_000, dtype=torch.float32)}, "optimizer": {"state": torch.ones(50_000)}}
if where == "mid-file":
    parts["optimizer"]["later"] = BlockWhilePickled()   # optimizer.pt is half written
elif where == "before-rename":
    real = os.replace
    os.replace = lambda src, dst: (block(), real(src, dst))  # every file and the manifest are written
ckpt.save_checkpoint(root, 2, parts, {"note": "second"})
"""


def first_checkpoint(root: Path) -> Path:
    return ckpt.save_checkpoint(root, 1, {"model": {"w": torch.zeros(10)}, "optimizer": {"s": 1}}, {"note": "first"})


def kill_while_saving(root: Path, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root), str(marker), where])
    try:
        wait_for(marker.exists, what=f"the saver to reach {where}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["mid-file", "before-rename"])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path: Path, where: str):
    root = tmp_path / "checkpoints"
    first = first_checkpoint(root)
    kill_while_saving(root, tmp_path, where)
    stray = list(root.glob(".tmp-*"))
    assert stray and any((s / "model.pt").exists() for s in stray)  # the half-done save is there...
    assert ckpt.list_checkpoints(root) == [first]  # ...but never under a checkpoint's name
    assert ckpt.latest_checkpoint(root) == first
    parts, meta = ckpt.load_checkpoint(first)
    assert meta["note"] == "first" and torch.equal(parts["model"]["w"], torch.zeros(10))
    # The next save completes and sweeps what the killed one left.
    third = ckpt.save_checkpoint(root, 3, {"model": {"w": torch.ones(3)}}, {})
    assert ckpt.latest_checkpoint(root) == third and not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-manifest", "missing-file", "extra-byte"])
def test_a_damaged_newest_checkpoint_is_never_read(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "checkpoints"
    first = first_checkpoint(root)
    newest = ckpt.save_checkpoint(root, 2, {"model": {"w": torch.randn(1000)}, "optimizer": {"s": 2}}, {})
    model = newest / "model.pt"
    data = model.read_bytes()
    if damage == "truncate":
        model.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        model.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "extra-byte":
        model.write_bytes(data + b"\0")
    elif damage == "no-manifest":
        (newest / ckpt.MANIFEST).unlink()
    elif damage == "bad-manifest":
        (newest / ckpt.MANIFEST).write_text("{not json")
    else:
        (newest / "optimizer.pt").unlink()
    assert not ckpt.verify(newest)
    assert ckpt.latest_checkpoint(root) == first
    assert "incomplete or corrupt" in capsys.readouterr().err


BLOCKING_JSON = r"""
import pathlib, sys, time
from optjob.steps.layout import write_json_atomic
class Slow:
    def __str__(self):
        pathlib.Path(sys.argv[2]).write_text("writing")
        time.sleep(120)
        return "x"
write_json_atomic(pathlib.Path(sys.argv[1]), {"step": 2, "payload": "y" * 100_000, "slow": Slow()})
"""


def test_kill_during_a_json_write_keeps_the_old_file(tmp_path: Path):
    """results.json, done.json, job.json: a reader sees the old file or the new one, never half."""
    target = tmp_path / "results.json"
    write_json_atomic(target, {"step": 1})
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_JSON, str(target), str(marker)])
    wait_for(marker.exists, what="the writer")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert json.loads(target.read_text()) == {"step": 1}
    assert any(p.name.startswith(".results.json.") for p in tmp_path.iterdir())  # the half file, elsewhere


def _disk_full(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_save_is_a_clear_error(tmp_path: Path):
    root = tmp_path / "checkpoints"
    first = first_checkpoint(root)
    code = ("import pathlib, sys, torch\nfrom optjob.steps import checkpoint as ckpt\n"
            "ckpt.save_checkpoint(pathlib.Path(sys.argv[1]), 2, {'model': {'w': torch.randn(100_000)}}, {})\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                          preexec_fn=_disk_full(64 * 1024), timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("optjob.specs.errors.StepError: could not write checkpoint step-000002")
    assert "disk full" in last and "step-000001 is kept" in last
    assert ckpt.list_checkpoints(root) == [first] and ckpt.verify(first)
    assert not list(root.glob(".tmp-*"))


TRAIN = {"max_steps": 30, "lr": 3e-3, "batch_size": 8, "checkpoint_every": 6, "log_every": 1, "seed": 1}


def workload(folder: Path, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "OPTJOB_ATTEMPT": "1"}
    env.pop("OPTJOB_DEADLINE", None)
    return subprocess.Popen([sys.executable, "-u", "-m", "optjob.steps", "run", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)  # type: ignore[call-overload]


def events(text: str) -> list[dict]:
    from optjob.steps.events import parse_event

    return [e for e in map(parse_event, text.splitlines()) if e is not None]


def test_disk_full_in_the_workload_keeps_the_checkpoint_and_resumes(tmp_path: Path):
    """The real workload: stopped once with a checkpoint; rerun with writes capped, its next save fails
    with an error event naming the kept checkpoint (exit 1); rerun normally, it resumes from that one."""
    folder = tmp_path / "job"
    spec = {"name": "tiny", "model": {"init": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128,
                                               "vocab": 512}},
            "data": {"source": "builtin:python-docs", "seq_len": 32, "max_chars": 200_000},
            "steps": [{"train": TRAIN}]}
    quick_eval = {"max_batches": 2, "latency_repeats": 1, "generate_tokens": 4}  # baseline and final
    JobFile(spec=spec, device="cpu", extra={"auto_evaluate": quick_eval}).write(folder)
    root = step_dir(folder, 0, "train") / "checkpoints"

    first = workload(folder)
    assert first.stdout is not None
    for line in first.stdout:
        if '"event": "checkpoint"' in line:
            first.send_signal(signal.SIGTERM)  # stop gracefully: one more checkpoint at the step reached
            break
    first.communicate(timeout=120)
    assert first.returncode == 143
    kept = ckpt.latest_checkpoint(root)
    assert kept is not None
    kept_manifest = (kept / ckpt.MANIFEST).read_bytes()

    full = workload(folder, preexec_fn=_disk_full(256 * 1024))  # a model.pt is ~600 kB
    out, err = full.communicate(timeout=120)
    assert full.returncode == 1, err
    (error,) = [e for e in events(out) if e["event"] == "error"]
    assert error["message"].startswith("could not write checkpoint step-")
    assert f"{kept.name} is kept" in error["message"] and "disk full" in error["message"]
    assert ckpt.latest_checkpoint(root) == kept and (kept / ckpt.MANIFEST).read_bytes() == kept_manifest
    assert not list(root.glob(".tmp-*"))

    again = workload(folder)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"resuming from {kept}" in err
    progress = [e["step"] for e in events(out) if e["event"] == "progress"]
    assert progress[0] == int(kept.name.split("-")[1]) + 1 and progress[-1] == TRAIN["max_steps"]
