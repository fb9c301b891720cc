"""The manager process under faults, through the real CLI with the stand-in workload: SIGKILL
during apply, Ctrl-C, and teardown that fails. The workload runs in its own process group
behind a shell that records its exit status, so whatever happens to the manager, `status` and a
second `apply` learn the truth and nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.commands import common, down
from optjob.manager.commands import status as status_cmd
from optjob.manager.controller import Controller, Outcome
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.planner import make_plan
from optjob.manager.store import Store
from optjob.providers.base import Handle, LaunchRequest
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec
from optjob.specs.errors import TeardownError
from reliability_harness import Cli, log_events, make_standin, pgid_alive, standin_spec, wait_for


def spec_file(tmp_path: Path, **kw: str) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(standin_spec(**kw))
    return str(f)


def attempt_log(home: Path, n: int = 1) -> Path:
    return home / "jobs" / "tiny" / "logs" / f"attempt-{n}.log"


def exit_file(home: Path, n: int = 1) -> Path:
    return attempt_log(home, n).with_suffix(".exit")


def start_then_kill_manager(cli: Cli, spec: str, home: Path, reap: list, **env: str) -> int:
    """Start `optjob apply`, SIGKILL it once the workload has printed progress; return the workload's pgid."""
    manager = cli.popen("apply", spec, "--local", "--yes", **env)
    reap.append(manager)
    wait_for(lambda: any(e["event"] == "progress" for e in log_events(attempt_log(home))), what="progress")
    manager.send_signal(signal.SIGKILL)
    manager.communicate(timeout=30)  # reaped: its pid is gone, as after a real crash
    (attempt,) = Store(home / "state.db").attempts("tiny")
    return int(Handle.from_json(attempt.handle or {}).data["pgid"])


def status(cli: Cli) -> dict:
    out = cli.json("status", "tiny")
    assert isinstance(out, dict)
    return out


def test_sigkilled_manager_status_reconciles_the_truth(tmp_path: Path, standin_cli: Cli, home: Path, reap: list):
    pgid = start_then_kill_manager(standin_cli, spec_file(tmp_path), home, reap, STANDIN_STEPS="40")
    assert status(standin_cli)["status"] == "running"  # the workload outlives its manager
    wait_for(exit_file(home).exists, what="the workload to finish on its own")
    row = status(standin_cli)
    assert (row["status"], row["reason"], row["attempts"]) == ("succeeded", "succeeded", 1)
    store = Store(home / "state.db")
    (attempt,) = store.attempts("tiny")
    assert attempt.status == "succeeded" and attempt.exit_code == 0 and attempt.released == 1
    assert len(store.events("tiny", kinds=("progress",))) == 40  # the tail it printed unwatched, ingested
    assert not pgid_alive(pgid)


def test_sigkilled_manager_workload_keeps_its_budget_deadline(tmp_path: Path, standin_cli: Cli, home: Path,
                                                             reap: list):
    # $1/s and a $16 cap: the workload gets OPTJOB_DEADLINE = launch + 16 s - the 1 s teardown margin.
    spec = spec_file(tmp_path, resources="{cloud: local, hourly_usd: 3600}", extra="budget: {max_usd: 16}\n",
                     train="{max_steps: 1}")  # planned at well under the cap
    pgid = start_then_kill_manager(standin_cli, spec, home, reap, STANDIN_STEPS="100000")
    wait_for(exit_file(home).exists, timeout=60, what="the workload to stop at its deadline")
    assert exit_file(home).read_text().strip() == "4"
    last = log_events(attempt_log(home))[-1]
    assert (last["event"], last["reason"]) == ("stopped", "deadline")
    row = status(standin_cli)
    assert (row["status"], row["reason"]) == ("stopped", "budget")
    assert Store(home / "state.db").attempts("tiny")[0].released == 1
    assert not pgid_alive(pgid)


def test_apply_again_attaches_to_the_running_orphan(tmp_path: Path, standin_cli: Cli, home: Path, reap: list):
    spec = spec_file(tmp_path)
    pgid = start_then_kill_manager(standin_cli, spec, home, reap, STANDIN_STEPS="60")
    again = standin_cli.run("apply", spec, "--local", "--yes", STANDIN_STEPS="60")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running (pid" in again.stdout and "tiny: succeeded" in again.stdout
    store = Store(home / "state.db")
    assert len(store.attempts("tiny")) == 1  # followed, not a second copy
    assert store.attempts("tiny")[0].released == 1 and not pgid_alive(pgid)


def test_apply_again_after_the_orphan_ended_records_it_first(tmp_path: Path, standin_cli: Cli, home: Path,
                                                            reap: list):
    """The workload finished while no manager watched; `apply` again must first record how it ended
    (its events, its exit, its teardown) instead of leaving attempt 1 'running' forever."""
    spec = spec_file(tmp_path)
    pgid = start_then_kill_manager(standin_cli, spec, home, reap, STANDIN_STEPS="30")
    wait_for(exit_file(home).exists, what="the orphan to finish")
    again = standin_cli.run("apply", spec, "--local", "--yes", "--json", STANDIN_STEPS="5")
    assert again.returncode == 0, again.stderr
    store = Store(home / "state.db")
    first, second = store.attempts("tiny")
    assert (first.status, first.exit_code, first.released, first.run) == ("succeeded", 0, 1, 1)
    assert [e["step"] for _, e in store.events("tiny", kinds=("progress",)) if e["attempt"] == 1] == list(range(1, 31))
    assert (second.status, second.run, second.released) == ("succeeded", 2, 1)
    assert not pgid_alive(pgid)


def test_apply_again_after_a_machine_crash_starts_over_from_the_record(tmp_path: Path, standin_cli: Cli,
                                                                      home: Path, reap: list):
    """Manager and workload both SIGKILLed (the shell too: no exit status recorded). `apply` again
    records attempt 1 as lost and released, and runs the job again (the real workload resumes from
    its checkpoints; see test_interrupts_real.py)."""
    spec = spec_file(tmp_path)
    pgid = start_then_kill_manager(standin_cli, spec, home, reap, STANDIN_STEPS="100000")
    os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not pgid_alive(pgid), what="the group to die")
    again = standin_cli.run("apply", spec, "--local", "--yes", "--json", STANDIN_STEPS="5")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "succeeded"
    first, second = Store(home / "state.db").attempts("tiny")
    assert (first.status, first.released) == ("lost", 1) and first.ended_at is not None
    assert (second.status, second.released) == ("succeeded", 1)
    assert not exit_file(home).exists()


@pytest.mark.parametrize("teardown, released", [("never", 0), ("always", 1)])
def test_ctrl_c_stops_gracefully_and_tears_down_per_policy(tmp_path: Path, standin_cli: Cli, home: Path,
                                                          reap: list, teardown: str, released: int):
    spec = spec_file(tmp_path, extra=f"teardown: {teardown}\n")
    manager = standin_cli.popen("apply", spec, "--local", "--yes", STANDIN_STEPS="100000")
    reap.append(manager)
    wait_for(lambda: any(e["event"] == "progress" for e in log_events(attempt_log(home))), what="progress")
    manager.send_signal(signal.SIGINT)
    out, err = manager.communicate(timeout=120)
    assert manager.returncode == 130, out + err
    assert "interrupted: checkpointing and stopping" in out and "apply again to resume" in err
    store = Store(home / "state.db")
    (attempt,) = store.attempts("tiny")
    assert attempt.exit_code == 143 and attempt.status == "stopped" and attempt.released == released
    assert [e["event"] for _, e in store.events("tiny")][-1] == "stopped"
    job = store.job("tiny")
    assert job is not None and (job.status, job.reason) == (JobStatus.STOPPED, Reason.CANCELLED)
    down = standin_cli.run("down", "tiny")
    assert down.returncode == 0 and Store(home / "state.db").attempts("tiny")[0].released == 1


def test_a_workload_whose_shell_was_killed_is_not_orphaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An OOM killer may take the wrapper shell alone. The attempt still runs (no second copy is
    launched beside it) and teardown still reaches the workload."""
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    provider = LocalProvider(python=make_standin(tmp_path))
    spec = loads_spec(standin_spec())
    handle = provider.launch(LaunchRequest(spec=spec, job_dir=tmp_path / "job", attempt=1))
    wait_for(lambda: log_events(tmp_path / "job" / "logs" / "attempt-1.log"), what="the stand-in")
    os.kill(handle.data["pid"], signal.SIGKILL)  # the shell only
    wait_for(lambda: provider.poll(handle).state.value == "running" and not _shell_alive(handle), what="shell gone")
    assert provider.poll(handle).state.value == "running" and pgid_alive(handle.data["pgid"])
    provider.teardown(handle)
    assert not pgid_alive(handle.data["pgid"])
    assert provider.poll(handle).state.is_terminal()


def _shell_alive(handle: Handle) -> bool:
    try:
        os.waitpid(handle.data["pid"], os.WNOHANG)
    except ChildProcessError:
        return False
    return True


# ---- teardown that fails --------------------------------------------------------------------------


class FailingTeardown(LocalProvider):
    """The local provider whose teardown fails ``failures`` times (forever when None)."""

    def __init__(self, python: str, failures: int | None) -> None:
        super().__init__(python=python)
        self.failures, self.calls = failures, 0

    def teardown(self, handle: Handle) -> None:
        self.calls += 1
        if self.failures is None or self.failures > 0:
            if self.failures:
                self.failures -= 1
            raise TeardownError("the cloud says: try again")
        super().teardown(handle)


def run_controller(provider: LocalProvider) -> tuple[Store, Outcome]:
    s = loads_spec(standin_spec())
    store = Store(paths.db_path())
    return store, Controller(store, provider, tick_s=0.05).apply(make_plan(s), s)


def test_one_retry_layer_the_manager_calls_teardown_once_and_the_next_look_confirms(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Retrying a teardown is the provider's (at its boundary, within its budget); the manager
    does not stack a second loop on it: one call, and an unconfirmed teardown waits for `down`."""
    monkeypatch.setenv("STANDIN_STEPS", "2")
    provider = FailingTeardown(make_standin(tmp_path), failures=1)
    with pytest.raises(TeardownError):
        run_controller(provider)
    assert provider.calls == 1
    store = Store(paths.db_path())
    assert store.attempts("tiny")[0].released == 0
    store.update_job("tiny", owner_pid=None)
    monkeypatch.setattr(common, "provider_for", lambda name: provider)
    down.down_command("tiny")
    assert provider.calls == 2 and Store(paths.db_path()).attempts("tiny")[0].released == 1


def test_teardown_that_never_succeeds_leaves_the_job_unreleased_until_down(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("STANDIN_STEPS", "2")
    standin = make_standin(tmp_path)
    broken = FailingTeardown(standin, failures=None)
    with pytest.raises(TeardownError):
        run_controller(broken)
    store = Store(paths.db_path())
    (attempt,) = store.attempts("tiny")
    job = store.job("tiny")
    assert attempt.released == 0 and job is not None
    assert not job.status.is_terminal()  # never marked done while its resources may be up
    assert broken.calls == 1
    store.update_job("tiny", owner_pid=None)  # as after the CLI exited with that error
    # `status` shows the job (and the problem) without failing, and still does not mark it done.
    monkeypatch.setattr(common, "provider_for", lambda name: broken)
    status_cmd.status_command(None, as_json=True)
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "tiny" and rows[0]["status"] not in ("succeeded", "failed", "stopped")
    assert "try again" in rows[0]["message"] and "optjob down tiny" in rows[0]["message"]
    # Once the provider answers again, `down` releases it and records how the job really ended.
    healed = FailingTeardown(standin, failures=0)
    monkeypatch.setattr(common, "provider_for", lambda name: healed)
    down.down_command("tiny")
    store = Store(paths.db_path())
    assert store.attempts("tiny")[0].released == 1
    job = store.job("tiny")
    assert job is not None and (job.status, job.reason) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED)


def test_teardown_failure_reaches_the_cli_as_one_line(tmp_path: Path, standin_cli: Cli):
    """Through the CLI: exit 1 and a hint to retry `optjob down`."""
    driver = tmp_path / "broken_driver.py"
    driver.write_text(
        "import sys\nimport optjob.manager.commands.common as c\nfrom optjob.providers.local import LocalProvider\n"
        "from optjob.specs.errors import TeardownError\n"
        "class Broken(LocalProvider):\n"
        "    def teardown(self, handle):\n        raise TeardownError('cloud unreachable')\n"
        f"c.provider_for = lambda name: Broken(python={standin_cli.env['OPTJOB_TEST_STANDIN']!r})\n"
        "from optjob.manager.cli import main\nmain(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, str(driver), "apply", spec_file(tmp_path), "--local", "--yes"],
                          capture_output=True, text=True, env={**standin_cli.env, "STANDIN_STEPS": "2"}, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cloud unreachable" in lines[0] and "Traceback" not in proc.stderr

