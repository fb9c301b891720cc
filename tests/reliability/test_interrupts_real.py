"""Ctrl-C during `optjob apply` with the real workload on a tiny model: the controller sends the
workload (in its own process group, so the terminal's SIGINT never reaches it) exactly one
SIGTERM; it finishes the optimizer step, writes a checkpoint and exits 143; resources are torn
down per policy and apply exits 130. `apply` again resumes from that checkpoint."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from optjob.manager.store import Store
from optjob.steps import checkpoint as ckpt
from optjob.steps.layout import step_dir
from reliability_harness import Cli, log_events, tiny_spec, wait_for

TRAIN = "  - train: {max_steps: 200, lr: 3.0e-3, batch_size: 8, checkpoint_every: 1000, log_every: 5, seed: 1}\n"


@pytest.mark.slow
def test_ctrl_c_checkpoints_then_apply_again_resumes(tmp_path: Path, cli: Cli, home: Path, reap: list):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec(steps=TRAIN))
    log = home / "jobs" / "tiny" / "logs" / "attempt-1.log"
    manager = cli.popen("apply", str(spec), "--local", "--yes")
    reap.append(manager)
    wait_for(lambda: any(e["event"] == "progress" for e in log_events(log)), timeout=120, what="training")
    manager.send_signal(signal.SIGINT)
    out, err = manager.communicate(timeout=120)
    assert manager.returncode == 130, out + err
    assert "apply again to resume" in err and len(err.strip().splitlines()) == 1

    text = log.read_text()
    assert text.count("stopping after the current step") == 1 and "again: stopping now" not in text
    events = log_events(log)
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    (saved,) = [e for e in events if e["event"] == "checkpoint"]  # checkpoint_every is 1000: the stop wrote it
    assert stopped["reason"] == "signal" and 0 < stopped["step"] == saved["step"] < 200
    folder = step_dir(home / "jobs" / "tiny", 0, "train") / "checkpoints"
    assert ckpt.latest_checkpoint(folder) == Path(saved["path"])
    assert log.with_suffix(".exit").read_text().strip() == "143"

    store = Store(home / "state.db")
    (attempt,) = store.attempts("tiny")
    assert (attempt.status, attempt.exit_code, attempt.released) == ("stopped", 143, 1)  # teardown: always
    row = cli.json("status", "tiny")
    assert isinstance(row, dict) and (row["status"], row["reason"]) == ("stopped", "cancelled")
    assert (home / "jobs" / "tiny" / "report.md").exists()

    again = cli.run("apply", str(spec), "--local", "--yes", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["status"] == "succeeded"
    resumed = (home / "jobs" / "tiny" / "logs" / "attempt-2.log").read_text()
    assert f"resuming from {saved['path']} (step {saved['step']})" in resumed
    progress = [e["step"] for e in log_events(home / "jobs" / "tiny" / "logs" / "attempt-2.log")
                if e["event"] == "progress"]
    assert progress[0] > saved["step"] and progress[-1] == 200


@pytest.mark.slow
def test_a_stop_delivered_twice_at_once_still_checkpoints(tmp_path: Path):
    """A process-tree kill (SkyPilot's cancel, or a group signal through a forwarding shell) hands the
    workload the same SIGTERM twice, milliseconds apart: that is one request, and it checkpoints.
    (Optimizer steps are made slow here so the second TERM lands inside the step the first let finish.)"""
    import os
    import subprocess
    import sys

    from optjob.steps.layout import JobFile

    folder = tmp_path / "job"
    spec = {"name": "tiny", "model": {"init": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128,
                                               "vocab": 512}},
            "data": {"source": "builtin:python-docs", "seq_len": 32, "max_chars": 200_000},
            "steps": [{"train": {"max_steps": 400, "batch_size": 32, "grad_accum": 4, "checkpoint_every": 1000,
                                 "log_every": 1}}]}
    JobFile(spec=spec, device="cpu", extra={"auto_evaluate": {"max_batches": 2, "latency_repeats": 1}}).write(folder)
    env = {k: v for k, v in os.environ.items() if k != "OPTJOB_DEADLINE"}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "optjob.steps", "run", str(folder)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if '"progress"' in line and len([x for x in seen if '"progress"' in x]) == 1:
            proc.send_signal(signal.SIGTERM)
        elif "stopping after the current step" in line:
            proc.send_signal(signal.SIGTERM)  # the duplicate, while that step still runs
            break
    out, _ = proc.communicate(timeout=120)
    text = "".join(seen) + out
    assert proc.returncode == 143, text[-2000:]
    assert "again: stopping now" not in text
    saved = [json.loads(x) for x in text.splitlines() if x.startswith('{"event": "checkpoint"')]
    assert len(saved) == 1 and ckpt.verify(Path(saved[0]["path"]))
