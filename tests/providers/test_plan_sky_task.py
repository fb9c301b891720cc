"""``optjob plan SPEC --sky-task``: the SkyPilot task YAML apply would launch, which SkyPilot's own parser
accepts (as ``sky launch`` would, secrets supplied with ``--secret``), with no secret in it; and the refusals
that go with cloud runs (a secret missing from the environment, a cloud run without storage)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_sky import sky_home  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "tests" / "data" / "skypilot-catalog" / "v8"
SENTINEL = "hf-sentinel-5d0c9a1e-never-printed"
SPEC = """name: skyt
model: {init: {layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}
steps: [{train: {max_steps: 10}}]
resources: {cloud: gcp, accelerators: "L4:1", spot: true}
storage: {artifacts: gs://my-bucket/jobs/skyt}
env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}
secrets: [HF_TOKEN, WANDB_API_KEY]
budget: {max_usd: 50}
"""


def run(spec: Path, *args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    return subprocess.run([sys.executable, "-m", "optjob.manager.cli", "plan", str(spec), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**base, "OPTJOB_HOME": str(home), "OPTJOB_CATALOG_DIR": str(CATALOG), **env})


def test_sky_task_is_the_task_apply_launches_and_skypilot_accepts_it(tmp_path: Path, sky_home: Path) -> None:  # noqa: F811
    import sky

    spec = tmp_path / "skyt.yaml"
    spec.write_text(SPEC)
    proc = run(spec, "--sky-task", home=tmp_path / "home", HF_TOKEN=SENTINEL, WANDB_API_KEY=SENTINEL + "-w")
    assert proc.returncode == 0, proc.stderr
    assert SENTINEL not in proc.stdout + proc.stderr
    assert proc.stdout.startswith("# The SkyPilot task `optjob apply` launches for skyt")
    assert "sky jobs launch task.yaml --secret HF_TOKEN --secret WANDB_API_KEY" in proc.stdout
    config = yaml.safe_load(proc.stdout)
    assert config["secrets"] == {"HF_TOKEN": None, "WANDB_API_KEY": None}
    assert config["envs"]["OPTJOB_STORAGE"] == "gs://my-bucket/jobs/skyt"
    assert config["envs"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert config["resources"]["use_spot"] is True and config["resources"]["accelerators"] == {"L4": 1}
    assert config["file_mounts"]["~/optjob-job/job.json"] == str(tmp_path / "home" / "jobs" / "skyt" / "job.json")
    assert "google-cloud-storage==" in config["setup"]  # the bucket's SDK, pinned
    # As `sky jobs launch task.yaml --secret HF_TOKEN --secret WANDB_API_KEY` reads it:
    task = sky.Task.from_yaml_config(yaml.safe_load(proc.stdout),
                                     secrets_overrides=[("HF_TOKEN", "a"), ("WANDB_API_KEY", "b")])
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == {"HF_TOKEN": "a", "WANDB_API_KEY": "b"}
    assert task.num_nodes == 1 and task.setup and "optjob.steps run" in (task.run or "")
    assert next(iter(task.resources)).use_spot
    # No SkyPilot task for a plan that runs here.
    proc = run(spec, "--sky-task", "--local", home=tmp_path / "home", HF_TOKEN="x", WANDB_API_KEY="y")
    assert proc.returncode == 2 and "no SkyPilot task" in proc.stderr


def test_a_named_secret_missing_from_the_environment_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "skyt.yaml"
    spec.write_text(SPEC)
    for args in (("--sky-task",), ("--json",), ()):
        proc = run(spec, *args, home=tmp_path / "home", HF_TOKEN=SENTINEL)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "error: secrets: WANDB_API_KEY is not set in this environment; export it where you run optjob "
            "(or remove it from secrets:)"]
        assert SENTINEL not in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "apply", str(spec), "--yes"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")},
                               "OPTJOB_HOME": str(tmp_path / "home"), "OPTJOB_CATALOG_DIR": str(CATALOG)})
    assert proc.returncode == 2 and "WANDB_API_KEY" in proc.stderr and not (tmp_path / "home" / "jobs").exists()


@pytest.mark.parametrize(("cloud", "scheme"), [("aws", "s3://"), ("gcp", "gs://"), ("azure", "az://")])
def test_a_spot_run_without_storage_is_refused_and_an_on_demand_one_is_copied_home(tmp_path: Path, cloud: str,
                                                                                 scheme: str) -> None:
    spec = tmp_path / "od.yaml"
    spec.write_text(f"name: od\nmodel: {{init: {{}}}}\nsteps: [{{train: {{max_steps: 10}}}}]\n"
                    f"resources: {{cloud: {cloud}, accelerators: 'A100:1'}}\n")
    proc = run(spec, home=tmp_path / "home")
    assert "storage.artifacts:" not in proc.stderr, proc.stderr  # on demand: not refused for its storage
    assert "the job folder (results, final model, logs) is copied home from the cluster" in " ".join(
        proc.stdout.split())
    assert run(spec, "--local", home=tmp_path / "home").returncode == 0
    spot = tmp_path / "spot.yaml"
    spot.write_text(spec.read_text().replace("'A100:1'}", "'A100:1', spot: true}"))
    proc = run(spot, home=tmp_path / "home")
    assert proc.returncode == 2 and f"spot cloud runs need storage.artifacts: {scheme}" in proc.stderr
