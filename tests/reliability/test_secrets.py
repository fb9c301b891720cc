"""Credentials never leak: with every usual secret variable and config file set to a sentinel,
a real `apply --local` plus status/list/report/cost/logs/plan (--json too) writes the sentinel
nowhere: not in any file under OPTJOB_HOME (state.db bytes included), nor in any output. The
SkyPilot task (what would reach a cloud node) carries none either."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from optjob.providers.sky_task import dump_yaml, task_config
from optjob.specs import loads_spec
from reliability_harness import Cli, tiny_spec

SECRET_VARS = ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AZURE_CLIENT_SECRET", "GITHUB_TOKEN", "OPENAI_API_KEY",
               "SKYPILOT_API_SERVER_TOKEN", "DATABASE_PASSWORD"]


def sentinel(name: str) -> str:
    return f"sentinel-{name.lower().replace('_', '-')}-7f3a9c1e"


def fake_home(root: Path) -> dict[str, str]:
    """A HOME whose AWS, SkyPilot and Hugging Face config files hold sentinels too."""
    (root / ".aws").mkdir(parents=True)
    (root / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {sentinel('file_key_id')}\naws_secret_access_key = {sentinel('file_key')}\n")
    (root / ".sky").mkdir()
    (root / ".sky" / "config.yaml").write_text(f"api_server:\n  token: {sentinel('sky_file')}\n")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "token").write_text(sentinel("hf_file"))
    return {"HOME": str(root), "AWS_SHARED_CREDENTIALS_FILE": str(root / ".aws" / "credentials")}


SENTINELS = [sentinel(v) for v in SECRET_VARS] + [sentinel(x) for x in ("file_key_id", "file_key", "sky_file",
                                                                          "hf_file")]


def leaks(blob: bytes) -> list[str]:
    return [s for s in SENTINELS if s.encode() in blob]


@pytest.mark.slow
def test_no_secret_reaches_state_logs_reports_or_output(tmp_path: Path, home: Path):
    env = {**os.environ, "OPTJOB_HOME": str(home), **fake_home(tmp_path / "user"),
           **{v: sentinel(v) for v in SECRET_VARS}}
    cli = Cli(home, env)
    spec = tmp_path / "tiny.yaml"
    control = "control-marker-not-a-secret"  # shows the scan does find what is there (the spec's copy)
    train = "  - train: {max_steps: 8, checkpoint_every: 4, log_every: 2}\n"
    spec.write_text(f"# {control}\n" + tiny_spec(steps=train) + "secrets: [HF_TOKEN, WANDB_API_KEY]\n"
                    "env: {WANDB_MODE: disabled}\n")
    cloud = tmp_path / "cloud.yaml"  # the same job for the cloud: what `plan --sky-task` prints
    cloud.write_text(spec.read_text().replace("{cloud: local, hourly_usd: 0.5}", "{cloud: aws, accelerators: A100:8}")
                     .replace("max_usd: 1.0", "max_usd: 100") + "storage: {artifacts: s3://bucket/prefix}\n")
    catalog = Path(__file__).resolve().parents[1] / "data" / "skypilot-catalog" / "v8"
    sky_task = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "plan", str(cloud), "--sky-task"],
                              capture_output=True, text=True, timeout=120,
                              env={**env, "OPTJOB_CATALOG_DIR": str(catalog)})
    assert sky_task.returncode == 0 and "HF_TOKEN: null" in sky_task.stdout, sky_task.stderr
    outputs = [sky_task.stdout + sky_task.stderr]
    for args in (("apply", str(spec), "--local", "--yes"), ("apply", str(spec), "--local", "--yes", "--json"),
                 ("status", "tiny", "--json"), ("status",), ("list", "--json"), ("report", "tiny", "--json"),
                 ("report", "tiny"), ("cost", "tiny", "--json"), ("cost",), ("logs", "tiny"),
                 ("plan", str(spec), "--local", "--json"), ("down", "tiny")):
        proc = cli.run(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    assert "succeeded" in outputs[3]
    assert not leaks("".join(outputs).encode())
    scanned, controls = 0, 0
    for root in (home, Path(os.environ["OPTJOB_CACHE"])):
        for f in root.rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                scanned += 1
                controls += control.encode() in blob
                assert not leaks(blob), f
    assert scanned > 10 and controls >= 1 and (home / "state.db").exists()
    assert any(f.name == "attempt-1.log" for f in home.rglob("*"))


def test_the_cloud_task_carries_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for v in SECRET_VARS:
        monkeypatch.setenv(v, sentinel(v))
    spec = loads_spec("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n"
                      "resources: {cloud: aws, accelerators: A100:1, spot: true}\n"
                      "storage: {artifacts: s3://bucket/prefix}\n")
    env = {"OPTJOB_DEADLINE": "1", "OPTJOB_TOKEN": sentinel("HF_TOKEN"), "OPTJOB_NOTE": sentinel("GITHUB_TOKEN"),
           "AWS_SECRET_ACCESS_KEY": sentinel("AWS_SECRET_ACCESS_KEY")}
    config = task_config(spec, attempt=1, env=env, job_file=tmp_path / "job.json",
                         wheel=tmp_path / "optjob-0.1.0-py3-none-any.whl")
    assert not leaks(dump_yaml(config).encode())
    assert config["envs"]["OPTJOB_DEADLINE"] == "1"  # ordinary OPTJOB_* values still pass


def test_spec_secrets_reach_skypilot_and_nothing_else(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: Path):
    """``secrets: [HF_TOKEN, WANDB_API_KEY]``: the real manager and SkyPilot provider (on the fake SkyPilot
    client) hand their values to SkyPilot's task secrets — and write them nowhere: not in state.db, job.json,
    the logs, the launch records, nor the ``plan --sky-task`` YAML. ``env:`` values do reach the node."""
    import sys
    import threading
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "providers"))
    from fake_sky import FakeSky
    from optjob.manager import paths
    from optjob.manager.controller import Controller
    from optjob.manager.planner import make_plan
    from optjob.manager.store import Store
    from optjob.providers.sky_task import build_task, preview_yaml
    from optjob.providers.skypilot import SkyPilotProvider

    for v in SECRET_VARS:
        monkeypatch.setenv(v, sentinel(v))
    spec = loads_spec("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n"
                      "resources: {cloud: aws, accelerators: A100:1}\n"
                      f"storage: {{artifacts: {tmp_path / 'artifacts'}}}\n"
                      "env: {WANDB_PROJECT: optjob-tests}\nsecrets: [HF_TOKEN, WANDB_API_KEY]\n")
    fake = FakeSky()
    provider = SkyPilotProvider(client=fake, wheel="/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl",
                                sleep=lambda s: time.sleep(min(s, 0.01)), backoff_s=0.01, teardown_timeout_s=20,
                                confirm_interval_s=0.01, log_interval_s=0.01)
    plan = make_plan(spec)
    done: dict[str, object] = {}

    def manager() -> None:
        try:
            done["outcome"] = Controller(Store(paths.db_path()), provider, tick_s=0.02).apply(plan, spec)
        except BaseException as exc:  # surfaced below
            done["error"] = exc

    thread = threading.Thread(target=manager, daemon=True)
    thread.start()
    for _ in range(3000):  # the launch reaching the fake SkyPilot
        cluster = fake.clusters_.get("optjob-tiny")
        if (cluster is not None and cluster.jobs) or not thread.is_alive():
            break
        time.sleep(0.01)
    assert cluster is not None and cluster.jobs, done
    fake.exit(cluster.jobs[max(cluster.jobs)], 0)
    thread.join(60)
    assert not thread.is_alive() and "error" not in done, done

    config = fake.configs[-1]
    values = {"HF_TOKEN": sentinel("HF_TOKEN"), "WANDB_API_KEY": sentinel("WANDB_API_KEY")}
    assert config["secrets"] == values  # handed to SkyPilot, which carries them to the node as secrets
    task = build_task(config)
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == values
    assert not leaks(yaml_dump(task.to_yaml_config(use_user_specified_yaml=True)).encode())
    assert config["envs"]["WANDB_PROJECT"] == "optjob-tests" and not leaks(yaml_dump(config["envs"]).encode())
    scanned = 0
    for f in home.rglob("*"):
        if f.is_file():
            scanned += 1
            assert not leaks(f.read_bytes()), f
    assert scanned > 3 and (home / "state.db").exists() and any(f.name == "job.json" for f in home.rglob("*"))
    shown = preview_yaml(spec, job_file=home / "jobs" / "tiny" / "job.json", wheel="/tmp/optjob-0.1.0-py3-none-any.whl")
    assert not leaks(shown.encode()) and "HF_TOKEN: null" in shown


def yaml_dump(data: object) -> str:
    import yaml

    return yaml.safe_dump(data)
