"""Reliability figures: fuzzed specs, rehearsed preemptions, concurrent applies, leaked secrets.

``python -m benchmarks.reliability [--quick]`` prints the figures as JSON; ``python -m benchmarks
--only reliability`` runs the same as a comparison of the suite. The tests in tests/reliability/
assert the same properties on smaller samples; this measures them at size:

- fuzz: documents from the four hostile families of tests/reliability/spec_fuzz.py (token soup,
  random trees, text and tree mutations of examples/*.yaml) through ``loads_spec``; a crash is any
  outcome other than a valid JobSpec or one SpecError naming the document (within 10 s).
- rehearsal: ``optjob apply --local --simulate-preemption 2`` (1 in ``--quick``) of a tiny real pipeline, per seed,
  against one uninterrupted run: kills survived, final metrics and trained weights identical, and
  the work each kill lost (last step logged by the killed attempt less the step the next resumed
  from) against ``checkpoint_every``.
- concurrent applies: two ``optjob apply`` of one name started together (stand-in workload);
  a duplicate is a run with more than one attempt.
- secrets: a real ``apply --local`` and every read command with credentials set to sentinels in
  the environment and in ~/.aws, ~/.sky and the Hugging Face token file; a leak is a sentinel in
  any file under OPTJOB_HOME (state.db bytes included) or any output.
- manager faults: the manager/provider cases of issue 13, each through the CLI with the stand-in
  workload; a case is handled when the record stays true and the user gets one clear line: `down`
  after a finished job whose pid was reused, a dry run beside a real job named NAME-dry-run, a
  manager SIGKILLed between starting the workload and saving its handle, 11 rehearsed kills (more
  than the recovery limit) and a rehearsal too short for its kills, a job folder that cannot be
  written when a finished job is applied again, SQLite's "database or disk is full" mid-run, and an
  empty state.db.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from .common import CACHE, PYTHON, REPO, Ctx, base_env

NAME = "reliability"
TITLE = "Reliability"
MEASURES = ("Fuzzed spec documents through the loader; `apply --simulate-preemption 2` of a tiny real pipeline "
            "against a straight run; pairs of concurrent `apply` of one name; a real apply plus every read command "
            "with credentials set to sentinels; the manager/provider fault cases of issue 13 "
            "(see benchmarks/reliability.py).")
GOAL = ("0 loader crashes, identical metrics after kills, lost work <= checkpoint_every, 0 duplicates, 0 leaks, "
        "every manager fault case handled")

#: Counts, not timings: ``--quick`` runs it beside the timed comparisons (benchmarks/__main__.py).
BESIDE = True
TESTS = REPO / "tests" / "reliability"
DRIVER = TESTS / "driver.py"
STANDIN = REPO / "tests" / "providers" / "standin.py"
EVERY = 10
TINY = """\
name: {name}
model:
  init: {{family: llama, layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}
data: {{source: "builtin:python-docs", seq_len: 32, max_chars: 200000}}
steps:
  - train: {{max_steps: 120, lr: 3.0e-3, batch_size: 8, checkpoint_every: {every}, log_every: 2, seed: 1}}
resources: {{cloud: local, hourly_usd: 0.5}}
budget: {{max_usd: 1.0, max_hours: 1}}
"""
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
               "WANDB_API_KEY", "AZURE_CLIENT_SECRET", "GITHUB_TOKEN", "OPENAI_API_KEY", "SKYPILOT_API_SERVER_TOKEN")


def cli(home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, str(DRIVER), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout, env={**(env or base_env()), "OPTJOB_HOME": str(home)})


# ---- fuzz ----------------------------------------------------------------------------------------


def fuzz(documents: int) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from spec_fuzz import STRATEGIES, check

    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    per_family = documents // len(STRATEGIES)
    slowest = 0.0

    def fuzz_family(family: str) -> None:
        @hseed(0)
        @settings(max_examples=per_family, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(STRATEGIES[family])
        def one(text: str) -> None:
            nonlocal slowest
            t = time.perf_counter()
            try:
                outcomes[f"{family}:{check(text)}"] += 1
            except Exception as exc:  # a crash: recorded, and the fuzzing goes on
                outcomes[f"{family}:crash"] += 1
                crashes.append(f"{family}: {type(exc).__name__}: {str(exc)[:200]} <- {text[:200]!r}")
            slowest = max(slowest, time.perf_counter() - t)

        one()

    for family in sorted(STRATEGIES):
        fuzz_family(family)
    tried = sum(outcomes.values())
    return {"documents": tried, "crashes": len(crashes), "valid": sum(v for k, v in outcomes.items()
                                                                        if k.endswith(":valid")),
            "by_family": dict(sorted(outcomes.items())), "slowest_document_s": round(slowest, 3),
            "crash_examples": crashes[:5]}


# ---- rehearsal -----------------------------------------------------------------------------------


def _events(path: Path) -> list[dict[str, Any]]:
    from optjob.steps.events import parse_event

    return [e for e in map(parse_event, path.read_text(errors="replace").splitlines()) if e is not None]


def rehearsal(seeds: list[int], tmp: Path, kills: int = 2) -> dict[str, Any]:
    home = tmp / "rehearsal-home"
    env = base_env(OPTJOB_CACHE=str(CACHE))
    straight_spec = tmp / "straight.yaml"
    straight_spec.write_text(TINY.format(name="straight", every=EVERY))
    proc = cli(home, "apply", str(straight_spec), "--local", "--yes", "--json", env=env)
    if proc.returncode:
        raise RuntimeError(f"straight run exited {proc.returncode}: {proc.stderr[-2000:]}")
    straight = json.loads((home / "jobs" / "straight" / "results.json").read_text())
    weights = "steps/00-train/model/model.safetensors"
    straight_weights = (home / "jobs" / "straight" / weights).read_bytes()
    runs: list[dict[str, Any]] = []
    for s in seeds:
        name = f"rehearsed-{s}"
        spec = tmp / f"{name}.yaml"
        spec.write_text(TINY.format(name=name, every=EVERY))
        proc = cli(home, "apply", str(spec), "--local", "--yes", "--simulate-preemption", str(kills),
                   "--preemption-seed", str(s), env=env)
        job = home / "jobs" / name
        logs = sorted((job / "logs").glob("attempt-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        codes = [int(p.with_suffix(".exit").read_text().strip()) for p in logs if p.with_suffix(".exit").exists()]
        lost = []
        for k in range(len(logs) - 1):
            logged = [e["step"] for e in _events(logs[k]) if e["event"] == "progress"]
            m = re.search(r"resuming from \S+ \(step (\d+)\)", logs[k + 1].read_text())
            lost.append(max(logged, default=0) - (int(m.group(1)) if m else 0))
        seen = re.search(r"work lost per kill \(steps\): \[([\d, ]*)\]", proc.stdout)
        results = json.loads((job / "results.json").read_text()) if (job / "results.json").exists() else {}
        same = bool(results) and all(results["final"][k] == straight["final"][k]
                                     for k in ("eval_loss", "perplexity", "accuracy"))
        same_weights = (job / weights).exists() and (job / weights).read_bytes() == straight_weights
        runs.append({"seed": s, "exit_code": proc.returncode, "attempt_exit_codes": codes,
                     "kills": codes.count(137), "metrics_identical": same, "weights_identical": same_weights,
                     "lost_steps_per_kill": lost,
                     "lost_steps_seen_by_manager": [int(x) for x in seen.group(1).split(",")] if seen else None})
    killed = sum(r["kills"] for r in runs)
    ok = [r for r in runs if r["exit_code"] == 0 and r["metrics_identical"] and r["weights_identical"]]
    return {"rehearsals": len(runs), "kills": killed, "kills_survived_identical": sum(r["kills"] for r in ok),
            "checkpoint_every": EVERY,
            "max_lost_steps_per_kill": max((n for r in runs for n in r["lost_steps_per_kill"]), default=0),
            "max_lost_steps_seen_by_manager": max((n for r in runs for n in r["lost_steps_seen_by_manager"] or []),
                                                  default=0),
            "runs": runs}


# ---- concurrent applies --------------------------------------------------------------------------


def concurrent_applies(trials: int, tmp: Path) -> dict[str, Any]:
    exe = tmp / "standin-python"
    exe.write_text(f"#!/bin/sh\nexec {PYTHON} {STANDIN}\n")
    exe.chmod(0o755)
    spec = tmp / "standin.yaml"
    spec.write_text("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nresources: {cloud: local}\n")
    env = base_env(OPTJOB_TEST_STANDIN=str(exe), STANDIN_ROOT=os.pathsep.join(sys.path), STANDIN_STEPS="30")
    duplicates = failures = attached = 0
    failure_tails: list[str] = []
    for i in range(trials):
        home = tmp / f"concurrent-{i}"
        procs = [subprocess.Popen([PYTHON, str(DRIVER), "apply", str(spec), "--local", "--yes"], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  env={**env, "OPTJOB_HOME": str(home)}) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            if p.returncode:
                failures += 1
                failure_tails.append(f"trial {i}: exit {p.returncode}: {err.strip()[-300:]}")
        attached += sum("already running (pid" in o for o, _ in outs)
        con = sqlite3.connect(home / "state.db")
        try:
            n = con.execute("SELECT COUNT(*) FROM attempts WHERE job_name = 'tiny'").fetchone()[0]
        finally:
            con.close()
        duplicates += n > 1
    return {"trials": trials, "duplicate_jobs": duplicates, "second_apply_attached": attached,
            "failed_applies": failures, "failures": failure_tails[:5]}


# ---- secrets -------------------------------------------------------------------------------------


def secrets(tmp: Path, quick: bool = False) -> dict[str, Any]:
    def sentinel(name: str) -> str:
        return f"sentinel-{name.lower().replace('_', '-')}-7f3a9c1e"

    user = tmp / "user"
    (user / ".aws").mkdir(parents=True)
    (user / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key = {sentinel('file_key')}\n")
    (user / ".sky").mkdir()
    (user / ".sky" / "config.yaml").write_text(f"api_server:\n  token: {sentinel('sky_file')}\n")
    (user / ".cache" / "huggingface").mkdir(parents=True)
    (user / ".cache" / "huggingface" / "token").write_text(sentinel("hf_file"))
    values = [sentinel(v) for v in SECRET_VARS] + [sentinel(x) for x in ("file_key", "sky_file", "hf_file")]
    env = base_env(OPTJOB_CACHE=str(CACHE), HOME=str(user), AWS_SHARED_CREDENTIALS_FILE=str(user / ".aws/credentials"),
                   **{v: sentinel(v) for v in SECRET_VARS})
    home = tmp / "secrets-home"
    spec = tmp / "secrets.yaml"
    spec.write_text(TINY.format(name="secrets", every=EVERY).replace("max_steps: 120", "max_steps: 12"))
    output = ""
    applies: list[tuple[str, ...]] = [("apply", str(spec), "--local", "--yes")]
    if not quick:
        applies.append(("apply", str(spec), "--local", "--yes", "--json"))
    commands = [*applies, ("status", "secrets", "--json"), ("list", "--json"), ("report", "secrets", "--json"),
                ("report", "secrets"), ("cost", "secrets", "--json"), ("logs", "secrets"),
                ("plan", str(spec), "--local", "--json"), ("down", "secrets")]
    for args in commands:
        proc = cli(home, *args, env=env)
        output += proc.stdout + proc.stderr
    leaks: list[str] = [f"output: {v}" for v in values if v in output]
    files = 0
    for f in home.rglob("*"):
        if f.is_file():
            files += 1
            blob = f.read_bytes()
            leaks += [f"{f.relative_to(home)}: {v}" for v in values if v.encode() in blob]
    return {"sentinels": len(values), "files_scanned": files, "commands": len(commands), "leaks": len(leaks),
            "leak_examples": leaks[:5]}


# ---- manager faults (issue 13) -------------------------------------------------------------------

#: A driver whose manager is SIGKILLed right after the workload started, before its handle is saved.
DYING_DRIVER = """\
import os, signal, sys
import optjob.manager.commands.common as c
from optjob.providers.local import LocalProvider
class Dying(LocalProvider):
    def launch(self, request):
        super().launch(request)
        os.kill(os.getpid(), signal.SIGKILL)
c.provider_for = lambda name: Dying(python=os.environ["OPTJOB_TEST_STANDIN"])
from optjob.manager.cli import main
main(sys.argv[1:])
"""
#: A driver whose state store has no room left once the first attempt is recorded (SQLITE_FULL).
FULL_DRIVER = """\
import sys
import optjob.manager.store as st
from optjob.manager import paths
class Full(st.Store):
    def add_attempt(self, *args, **kwargs):
        row = super().add_attempt(*args, **kwargs)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages}")
        return row
st.open_store = lambda: Full(paths.db_path())
sys.argv[0] = "optjob"
exec(open(sys.argv.pop(1)).read())
"""


def _wait(predicate: Any, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _one_line(proc: subprocess.CompletedProcess[str], *, code: int, says: str) -> bool:
    lines = proc.stderr.strip().splitlines()
    return (proc.returncode == code and len(lines) == 1 and says in lines[0] and "internal error" not in lines[0]
            and "Traceback" not in proc.stderr)


def _row(home: Path, name: str = "tiny") -> dict[str, Any]:
    con = sqlite3.connect(home / "state.db")
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        attempts = con.execute("SELECT * FROM attempts WHERE job_name = ? ORDER BY number", (name,)).fetchall()
    finally:
        con.close()
    return {**dict(row or {}), "attempts": [dict(a) for a in attempts]}


def _job_pids(home: Path) -> list[int]:
    marks = {f"OPTJOB_HOME={home}".encode(), b"OPTJOB_JOB=tiny"}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marks <= set((entry / "environ").read_bytes().split(b"\0")) \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def manager_faults(tmp: Path) -> dict[str, Any]:
    """Each case of issue 13 once, through the CLI with the stand-in workload: handled or not."""
    exe = tmp / "standin-python"
    exe.write_text(f"#!/bin/sh\nexec {PYTHON} {STANDIN}\n")
    exe.chmod(0o755)
    env = base_env(OPTJOB_TEST_STANDIN=str(exe), STANDIN_ROOT=os.pathsep.join(sys.path), STANDIN_STEPS="2")
    for name, text in (("dying.py", DYING_DRIVER), ("full.py", FULL_DRIVER)):
        (tmp / name).write_text(text)

    def spec(name: str = "tiny", extra: str = "") -> str:
        f = tmp / f"{name}.yaml"
        f.write_text(f"name: {name}\nmodel: {{init: {{}}}}\nsteps: [{{train: {{}}}}]\nresources: {{cloud: local}}\n"
                     + extra)
        return str(f)

    def run_in(home: Path, *args: str, driver: Path = DRIVER, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, str(driver), *args], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, env={**env, "OPTJOB_HOME": str(home), **extra})

    cases: dict[str, bool] = {}
    problems: list[str] = []

    def case(name: str, check: Any) -> None:
        home = tmp / f"faults-{name}"
        try:
            cases[name] = bool(check(home))
        except Exception as exc:  # a case that crashes is not handled; the others still run
            cases[name] = False
            problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            for pid in _job_pids(home):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)

    def pid_reuse(home: Path) -> bool:
        run_in(home, "apply", spec(extra="teardown: never\n"), "--local", "--yes")
        bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
        try:
            handle = json.loads(_row(home)["attempts"][0]["handle_json"])
            handle["data"].update(pid=bystander.pid, pgid=bystander.pid)
            con = sqlite3.connect(home / "state.db")
            con.execute("UPDATE attempts SET handle_json = ?", (json.dumps(handle),))
            con.commit()
            con.close()
            down = run_in(home, "down", "tiny")
            return down.returncode == 0 and bystander.poll() is None
        finally:
            bystander.kill()
            bystander.wait()

    def dry_run_name(home: Path) -> bool:
        run_in(home, "apply", spec("tiny-dry-run"), "--local", "--yes")
        before = _row(home, "tiny-dry-run")
        job_json = (home / "jobs" / "tiny-dry-run" / "job.json").read_bytes()
        dry = run_in(home, "apply", spec(), "--dry-run")
        return (_one_line(dry, code=2, says="is a real job") and _row(home, "tiny-dry-run") == before
                and (home / "jobs" / "tiny-dry-run" / "job.json").read_bytes() == job_json)

    def crash_in_launch(home: Path) -> bool:
        run_in(home, "apply", spec(), "--local", "--yes", driver=tmp / "dying.py", STANDIN_STEPS="60",
               STANDIN_SLEEP="0.05")
        status = run_in(home, "status", "tiny", "--json")
        running = status.returncode == 0 and json.loads(status.stdout)["status"] == "running"
        again = run_in(home, "apply", spec(), "--local", "--yes", "--json")
        row = _row(home)
        return (running and again.returncode == 0 and len(row["attempts"]) == 1
                and row["attempts"][0]["status"] == "succeeded" and not _job_pids(home))

    def rehearsal_over_limit(home: Path) -> bool:
        proc = run_in(home, "apply", spec(), "--local", "--yes", "--simulate-preemption", "11", STANDIN_STEPS="20",
                      STANDIN_SLEEP="0.1")  # each attempt outlives its kill point (1 to 6 events) by ticks
        statuses = [a["status"] for a in _row(home)["attempts"]]
        return proc.returncode == 0 and statuses == ["preempted"] * 11 + ["succeeded"]

    def rehearsal_shortfall(home: Path) -> bool:
        proc = run_in(home, "apply", spec(), "--local", "--yes", "--simulate-preemption", "3", STANDIN_STEPS="1")
        kills = sum(a["status"] == "preempted" for a in _row(home)["attempts"])
        return proc.returncode == 0 and (kills == 3 or f"only {kills} of the 3 kills" in proc.stderr)

    def unwritable_job_folder(home: Path) -> bool:
        run_in(home, "apply", spec(), "--local", "--yes")
        before = _row(home)
        (home / "jobs" / "tiny" / "spec.yaml").unlink()
        (home / "jobs" / "tiny" / "spec.yaml").mkdir()  # an OSError on writing, even for root
        proc = run_in(home, "apply", spec(), "--local", "--yes")
        run_in(home, "status", "tiny")
        after = _row(home)
        same = all(after[k] == before[k] for k in ("status", "reason", "run", "message", "spec_json"))
        return _one_line(proc, code=1, says="cannot write the job folder") and same

    def disk_full(home: Path) -> bool:
        proc = run_in(home, str(DRIVER), "apply", spec(), "--local", "--yes", driver=tmp / "full.py",
                      STANDIN_STEPS="200", STANDIN_SLEEP="0.01")
        exit_file = home / "jobs" / "tiny" / "logs" / "attempt-1.exit"
        ended = _wait(exit_file.exists)
        status = run_in(home, "status", "tiny", "--json")
        return (_one_line(proc, code=1, says="disk full: cannot write") and ended and status.returncode == 0
                and json.loads(status.stdout)["status"] == "succeeded")

    def empty_state_db(home: Path) -> bool:
        run_in(home, "apply", spec(), "--local", "--yes")
        (home / "state.db").write_bytes(b"")
        for extra in ("state.db-wal", "state.db-shm"):
            (home / extra).unlink(missing_ok=True)
        return _one_line(run_in(home, "list"), code=1, says="is an empty file")

    for name, check in (("pid_reuse_down", pid_reuse), ("dry_run_beside_real_job", dry_run_name),
                        ("killed_inside_launch", crash_in_launch), ("rehearsal_over_recovery_limit",
                                                                    rehearsal_over_limit),
                        ("rehearsal_shortfall_said", rehearsal_shortfall),
                        ("unwritable_job_folder", unwritable_job_folder), ("disk_full_mid_run", disk_full),
                        ("empty_state_db", empty_state_db)):
        case(name, check)
    return {"cases": len(cases), "handled": sum(cases.values()), "by_case": cases, "problems": problems}


# ---- the comparison ------------------------------------------------------------------------------


def measure(quick: bool, tmp: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    t = time.perf_counter()
    figures["fuzz"] = fuzz(400 if quick else 5000)
    figures["fuzz"]["seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    figures["concurrent_applies"] = concurrent_applies(2 if quick else 20, tmp)
    figures["concurrent_applies"]["seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    figures["rehearsal"] = rehearsal([0] if quick else [0, 1, 2], tmp, kills=1 if quick else 2)
    figures["rehearsal"]["seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    figures["secrets"] = secrets(tmp, quick)
    figures["secrets"]["seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    figures["manager_faults"] = manager_faults(tmp)  # counts: the same cases in --quick
    figures["manager_faults"]["seconds"] = round(time.perf_counter() - t, 1)
    return figures


def run(ctx: Ctx) -> dict[str, Any]:
    f = measure(ctx.quick, ctx.mkdtemp("reliability-"))
    fz, rh, ca, sc = f["fuzz"], f["rehearsal"], f["concurrent_applies"], f["secrets"]
    mf = f["manager_faults"]
    met = (fz["crashes"] == 0 and rh["kills_survived_identical"] == rh["kills"] > 0
           and rh["max_lost_steps_per_kill"] <= rh["checkpoint_every"] and ca["duplicate_jobs"] == 0
           and sc["leaks"] == 0 and mf["handled"] == mf["cases"])
    summary = (f"fuzz: {fz['documents']:,} malformed documents, {fz['crashes']} crashes; rehearsal: "
               f"{rh['kills_survived_identical']} of {rh['kills']} kills survived with identical metrics and weights, "
               f"at most {rh['max_lost_steps_per_kill']} steps lost per kill "
               f"(checkpoint_every {rh['checkpoint_every']})"
               f"; concurrent apply: {ca['duplicate_jobs']} duplicate jobs in {ca['trials']} trials; secrets: "
               f"{sc['leaks']} leaks of {sc['sentinels']} sentinels over {sc['files_scanned']} files"
               f"; manager faults: {mf['handled']} of {mf['cases']} cases handled")
    notes = [f"reliability: {c}" for c in fz["crash_examples"] + sc["leak_examples"] + mf["problems"]]
    notes += [f"reliability: manager fault not handled: {k}" for k, ok in mf["by_case"].items() if not ok]
    return {"summary": summary, "met": met, "metrics": f, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="400 documents, 2 trials, one rehearsal of one kill, one apply with secrets")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="optjob-reliability-") as tmp:
        try:
            out = run(Ctx(quick=args.quick, tmp=Path(tmp)))
        except Exception:
            traceback.print_exc()
            return 1
    print(json.dumps({"summary": out["summary"], "met": out["met"], **out["metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
