"""End to end on this machine: the real CLI, the real workload, a tiny model.

Also the resume guarantee: a run whose workload is SIGKILLed mid-train (as a spot
reclaim would) and relaunched ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.controller import Controller
from optjob.manager.job_states import JobStatus
from optjob.manager.planner import make_plan
from optjob.manager.rehearsal import Rehearsal
from optjob.manager.store import Store
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec

TINY = """\
name: {name}
model:
  init: {{family: llama, layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}
data: {{source: "builtin:python-docs", seq_len: 32, max_chars: 200000}}
steps:
{steps}
resources: {{cloud: local, hourly_usd: 0.5}}
budget: {{max_usd: 1.0, max_hours: 1}}
"""
TRAIN = "  - train: {max_steps: 24, lr: 3.0e-3, batch_size: 8, checkpoint_every: 6, log_every: 2, seed: 1}\n"
EVAL = "  - evaluate: {max_batches: 8, latency_repeats: 2, generate_tokens: 8}\n"


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optjob.manager.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OPTJOB_HOME": str(home)}, timeout=600)


@pytest.mark.slow
def test_apply_local_runs_the_pipeline_for_real(tmp_path: Path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(name="tiny", steps=TRAIN + EVAL))
    home = tmp_path / "home"
    proc = cli("apply", str(spec), "--local", "--yes", home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(cli("status", "tiny", "--json", home=home).stdout)
    assert status["status"] == "succeeded" and status["attempts"] == 1
    assert 0 < status["spent_usd"] < 1.0

    store = Store(home / "state.db")
    kinds = [e["event"] for _, e in store.events("tiny") if e["event"] not in ("phase", "check")]
    assert kinds[0] == "step_started" and kinds[-1] == "job_done"
    assert "checkpoint" in kinds and "step_done" in kinds and "progress" in kinds

    job_dir = home / "jobs" / "tiny"
    results = json.loads((job_dir / "results.json").read_text())
    assert results["final"]["perplexity"] < results["baseline"]["perplexity"]
    train_out = Path(results["steps"][0]["output"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(train_out)
    assert sum(p.numel() for p in model.parameters()) == results["steps"][0]["metrics"].get(
        "params", sum(p.numel() for p in model.parameters()))
    assert (job_dir / "report.md").exists() and (job_dir / "report.html").exists()
    # The same spec again: nothing to do — no new attempt, no charge.
    spent = json.loads(cli("cost", "tiny", "--json", home=home).stdout)["total_usd"]
    again = cli("apply", str(spec), "--local", "--yes", "--json", home=home)
    assert again.returncode == 0, again.stderr
    outcome = json.loads(again.stdout)
    assert outcome["up_to_date"] is True and outcome["attempts"] == 1
    assert json.loads(cli("cost", "tiny", "--json", home=home).stdout)["total_usd"] == spent
    # A changed spec runs again as a new run: the finished steps it shares are skipped.
    spec.write_text(spec.read_text().replace("latency_repeats: 2", "latency_repeats: 3", 1))
    changed = cli("apply", str(spec), "--local", "--yes", "--json", home=home)
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["attempts"] == 2


@pytest.mark.slow
def test_killed_workload_resumes_to_identical_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    store = Store(paths.db_path())

    def run(name: str, rehearsal: Rehearsal | None) -> dict:
        spec = loads_spec(TINY.format(name=name, steps=TRAIN + EVAL))
        out = Controller(store, LocalProvider(), tick_s=0.1, rehearsal=rehearsal).apply(make_plan(spec), spec)
        assert out.status == JobStatus.SUCCEEDED, out.message
        return json.loads((paths.job_dir(name) / "results.json").read_text())

    straight = run("straight", None)
    rehearsal = Rehearsal(kills=1, seed=0, max_events=8)
    killed = run("killed", rehearsal)
    assert len(rehearsal.done) == 1 and len(store.attempts("killed")) == 2
    kill = rehearsal.done[0]
    assert kill.lost_steps <= 6  # at most one checkpoint interval
    for key in ("eval_loss", "perplexity", "accuracy"):
        assert killed["final"][key] == pytest.approx(straight["final"][key], rel=1e-5), key


@pytest.mark.slow
def test_hpo_best_params_reach_the_next_step(tmp_path: Path):
    hpo = ("  - hpo: {trials: 2, sampler: random, trial_steps: 3, pruner: none,"
           " space: {train.max_steps: {choice: [7]}, train.lr: {log_uniform: [1.0e-3, 3.0e-3]}}}\n")
    spec = tmp_path / "hpo.yaml"
    spec.write_text(TINY.format(name="hpo", steps=hpo + TRAIN))
    home = tmp_path / "home"
    proc = cli("apply", str(spec), "--local", "--yes", home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = Store(home / "state.db")
    trials = [e for _, e in store.events("hpo", kinds=("trial",))]
    assert len(trials) == 2
    train_progress = [e for _, e in store.events("hpo", kinds=("progress",)) if e.get("index") == 1]
    assert train_progress and max(e["step"] for e in train_progress) == 7  # the searched max_steps


@pytest.mark.slow
def test_reapply_reuses_unchanged_steps_and_reruns_changed_ones(tmp_path: Path):
    spec = tmp_path / "re.yaml"
    home = tmp_path / "home"
    spec.write_text(TINY.format(name="re", steps=TRAIN + EVAL))
    assert cli("apply", str(spec), "--local", "--yes", home=home).returncode == 0
    same = cli("apply", str(spec), "--local", "--yes", home=home)  # the very same spec: nothing to do
    assert same.returncode == 0 and "nothing to do" in same.stdout
    store = Store(home / "state.db")
    assert len(store.attempts("re")) == 1
    # Only the evaluation changed: the finished train step is reused.
    spec.write_text(TINY.format(name="re", steps=TRAIN + EVAL.replace("latency_repeats: 2", "latency_repeats: 3")))
    assert cli("apply", str(spec), "--local", "--yes", home=home).returncode == 0

    def train_done(attempt: int) -> dict:
        return next(e for _, e in store.events("re", kinds=("step_done",))
                    if e["attempt"] == attempt and e["index"] == 0)

    assert train_done(2).get("skipped") is True  # an unchanged step is reused
    spec.write_text(TINY.format(name="re", steps=TRAIN.replace("lr: 3.0e-3", "lr: 1.0e-3") + EVAL))
    proc = cli("apply", str(spec), "--local", "--yes", home=home)
    assert proc.returncode == 0, proc.stderr
    assert not train_done(3).get("skipped")  # the train options changed: it ran again
    logs = cli("logs", "re", home=home).stdout
    assert "spec changed at steps[0] (train)" in logs
