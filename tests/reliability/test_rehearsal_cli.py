"""Preemption rehearsal through the CLI with the real workload on a tiny model:
`optjob apply SPEC --local --simulate-preemption 2` SIGKILLs the workload twice at seeded points,
relaunches it as a spot recovery would, and ends exactly where an uninterrupted run ends, having
lost at most one checkpoint interval of work per kill."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from optjob.manager.store import Store
from reliability_harness import Cli, log_events, tiny_spec

EVERY = 10
TRAIN = (f"  - train: {{max_steps: 120, lr: 3.0e-3, batch_size: 8, checkpoint_every: {EVERY}, log_every: 2,"
         " seed: 1}\n")


def lost_per_kill(job_dir: Path, attempts: int) -> list[int]:
    """The work each kill really cost: the last step attempt k logged, less the step attempt k+1
    resumed from (0 when it found no checkpoint). The manager's own figure (the rehearsal line)
    can only count the steps it had seen when it killed."""
    lost = []
    for k in range(1, attempts):
        logged = [e["step"] for e in log_events(job_dir / "logs" / f"attempt-{k}.log") if e["event"] == "progress"]
        nxt = (job_dir / "logs" / f"attempt-{k + 1}.log").read_text()
        m = re.search(r"resuming from \S+ \(step (\d+)\)", nxt)
        lost.append(max(logged, default=0) - (int(m.group(1)) if m else 0))
    return lost


@pytest.mark.slow
def test_two_rehearsed_preemptions_end_where_a_straight_run_ends(tmp_path: Path, cli: Cli, home: Path):
    for name in ("straight", "rehearsed"):
        (tmp_path / f"{name}.yaml").write_text(tiny_spec(name=name, steps=TRAIN))
    straight = cli.run("apply", str(tmp_path / "straight.yaml"), "--local", "--yes", "--json")
    assert straight.returncode == 0, straight.stderr
    proc = cli.run("apply", str(tmp_path / "rehearsed.yaml"), "--local", "--yes",
                   "--simulate-preemption", "2", "--preemption-seed", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"rehearsal: (\d+) kill\(s\) survived; work lost per kill \(steps\): \[([\d, ]*)\]", proc.stdout)
    assert m is not None, proc.stdout
    assert int(m.group(1)) == 2 and all(int(x) <= EVERY for x in m.group(2).split(","))

    store = Store(home / "state.db")
    attempts = store.attempts("rehearsed")
    assert [(a.status, a.exit_code) for a in attempts] == [("preempted", 137), ("preempted", 137), ("succeeded", 0)]
    assert all(a.released for a in attempts)
    assert all("rehearsal kill at step" in (a.detail or "") for a in attempts[:2])

    job_dir = home / "jobs" / "rehearsed"
    lost = lost_per_kill(job_dir, 3)
    assert all(0 <= n <= EVERY for n in lost), lost
    assert sum("resuming from" in (job_dir / "logs" / f"attempt-{k}.log").read_text() for k in (2, 3)) >= 1

    # Identical to the uninterrupted run: the metrics, and the trained weights byte for byte.
    a = json.loads((home / "jobs" / "straight" / "results.json").read_text())
    b = json.loads((job_dir / "results.json").read_text())
    for key in ("eval_loss", "perplexity", "accuracy"):
        assert b["final"][key] == a["final"][key], key
    assert b["steps"][0]["metrics"]["train_loss"] == a["steps"][0]["metrics"]["train_loss"]
    assert b["steps"][0]["extra"]["loss_curve"] == a["steps"][0]["extra"]["loss_curve"]
    weights = "steps/00-train/model/model.safetensors"
    assert (job_dir / weights).read_bytes() == (home / "jobs" / "straight" / weights).read_bytes()

    # The report lists every attempt and how it ended.
    report = (job_dir / "report.md").read_text()
    section = report.split("## Attempts", 1)[1].split("##", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 3, section
    assert [r.split("|")[2].strip() for r in rows] == ["preempted (exit 137)", "preempted (exit 137)", "succeeded"]
