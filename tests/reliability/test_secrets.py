"""Credentials never leak: with every usual secret variable and config file set to a sentinel,
a real `apply --local` plus status/list/report/cost/logs/plan (--json too) writes the sentinel
nowhere: not in any file under OPTJOB_HOME (state.db bytes included), nor in any output. The
SkyPilot task (what would reach a cloud node) carries none either."""

from __future__ import annotations

import os
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
    spec.write_text(f"# {control}\n" + tiny_spec(steps=train))
    outputs = []
    for args in (("apply", str(spec), "--local", "--yes"), ("apply", str(spec), "--local", "--yes", "--json"),
                 ("status", "tiny", "--json"), ("status",), ("list", "--json"), ("report", "tiny", "--json"),
                 ("report", "tiny"), ("cost", "tiny", "--json"), ("cost",), ("logs", "tiny"),
                 ("plan", str(spec), "--local", "--json"), ("down", "tiny")):
        proc = cli.run(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    assert "succeeded" in outputs[2]
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
