"""Spec -> SkyPilot task: every translated task must pass SkyPilot's own validation
(``sky.Task.from_yaml_config`` and the ``sky.Resources`` constructor, SkyPilot 0.14),
and must never carry a secret to the node."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_sky import BUCKET, make_spec, sky_home  # noqa: F401  (sky_home: fixture)
from optjob.providers import sky_task
from optjob.specs import JobSpec, load_spec
from optjob.specs.errors import PlanInfeasible, ProviderError

# The cloud extra is part of the test environment (make test installs it): no skip here.

ROOT = Path(__file__).resolve().parents[2]

INLINE: dict[str, dict[str, Any]] = {
    "aws-a100x8-spot": {"cloud": "aws", "accelerators": "A100:8", "spot": True, "region": "us-east-1",
                        "cpus": 32, "memory": "256GB", "disk_gb": 500, "max_hourly_usd": 40},
    "gcp-tpu-v5e": {"cloud": "gcp", "accelerators": "tpu-v5litepod-8", "region": "us-west4",
                    "zone": "us-west4-a"},
    "aws-h100x8-2-nodes": {"cloud": "aws", "accelerators": {"H100": 8}, "nodes": 2,
                           "max_hourly_usd": 200, "autostop_minutes": 30},
    "any-spot-auto-anyof": {"cloud": "any", "accelerators": ["A100:8", "H100:8"], "spot": "auto"},
    "gcp-spot-auto-single": {"cloud": "gcp", "accelerators": "L4:1", "spot": "auto"},
    "k8s-cpu": {"cloud": "kubernetes", "cpus": 4, "memory": "16GB"},
}


def _example_specs() -> list[tuple[str, JobSpec]]:
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        spec = load_spec(path)
        if spec.resources.cloud == "local":
            # The quickstart runs locally; translate it as if it asked for a cloud.
            spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"cloud": "aws"})})
        out.append((f"example-{path.stem}", spec))
    return out


CASES = [(k, make_spec(v)) for k, v in INLINE.items()] + _example_specs()


def translate(spec: JobSpec, attempt: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {"OPTJOB_DEADLINE": "1900000000", **(env or {})}
    return sky_task.task_config(spec, attempt=attempt, env=env, job_file="/tmp/optjob-jobs/x/job.json",
                                wheel="/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl")


@pytest.mark.parametrize(("case", "spec"), CASES, ids=[c for c, _ in CASES])
def test_task_passes_skypilot_validation(case: str, spec: JobSpec, sky_home: Path) -> None:  # noqa: F811
    import sky

    config = translate(spec)
    dumped = sky_task.dump_yaml(config)
    assert yaml.safe_load(dumped) == config
    task = sky.Task.from_yaml_config(yaml.safe_load(dumped))
    res = spec.resources
    assert task.num_nodes == res.nodes
    assert task.envs["OPTJOB_JOB"] == spec.name and task.envs["OPTJOB_ATTEMPT"] == "1"
    assert task.envs["OPTJOB_STORAGE"] == (spec.storage.artifacts or "")
    built = sky_task.build_resources(config)
    for candidates in (list(task.resources), built):
        assert len(candidates) == max(1, len(res.accelerator_choices)) * (2 if res.spot == "auto" else 1)
        for r in candidates:
            assert r.autostop_config is not None and r.autostop_config.enabled
            assert r.autostop_config.idle_minutes == res.autostop_minutes and r.autostop_config.down
            if res.max_hourly_usd is not None:
                assert r.max_hourly_cost == pytest.approx(res.max_hourly_usd / res.nodes)
        spots = sorted(bool(r.use_spot) for r in candidates)
        assert set(spots) == ({True, False} if res.spot == "auto" else {bool(res.spot)})
        names = {name for r in candidates for name in (r.accelerators or {})}
        assert names == {n for n, _ in res.accelerator_choices}
    if res.spot == "auto" and len(res.accelerator_choices) == 1:
        assert isinstance(task.resources, list)  # ordered: spot first, then on-demand
        assert [r.use_spot for r in task.resources] == [True, False]
    assert sky_task.uses_managed_jobs(spec) == (res.spot is not False)


@pytest.mark.parametrize(("case", "spec"), CASES, ids=[c for c, _ in CASES])
def test_scripts_are_valid_bash(case: str, spec: JobSpec, tmp_path: Path) -> None:
    config = translate(spec)
    for key in ("setup", "run"):
        script = tmp_path / f"{key}.sh"
        script.write_text(config[key])
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    assert "-m optjob.steps run" in config["run"]
    assert ("torchrun" in config["run"]) and "SKYPILOT_NODE_IPS" in config["run"]
    tpu = any(n.startswith("tpu-") for n, _ in spec.resources.accelerator_choices)
    assert ("torch_xla" in config["setup"]) == tpu
    assert "'optjob-0.1.0-py3-none-any.whl[workload]'" in config["setup"]
    assert ("boto3" in config["setup"]) == spec.storage.is_remote


def test_a100_spot_translation() -> None:
    config = translate(make_spec(INLINE["aws-a100x8-spot"]))
    assert config["resources"] == {
        "autostop": {"idle_minutes": 10, "down": True},
        "infra": "aws/us-east-1",
        "cpus": "32+",
        "memory": "256+",
        "disk_size": 500,
        "max_hourly_cost": 40.0,
        "accelerators": {"A100": 8},
        "use_spot": True,
    }
    assert config["file_mounts"] == {
        "~/optjob-job/job.json": "/tmp/optjob-jobs/x/job.json",
        "~/optjob-dist/optjob-0.1.0-py3-none-any.whl": "/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl",
    }
    assert config["envs"] == {"OPTJOB_ATTEMPT": "1", "OPTJOB_DEADLINE": "1900000000",
                              "OPTJOB_JOB": "cloudy", "OPTJOB_STORAGE": BUCKET}


def test_infra_strings() -> None:
    assert sky_task.infra(make_spec({"cloud": "any", "region": "us-east-1"})) == "*/us-east-1"
    assert sky_task.infra(make_spec({"cloud": "aws", "zone": "us-east-1a"})) == "aws/*/us-east-1a"
    assert sky_task.infra(make_spec({"cloud": "kubernetes"})) == "k8s"
    assert sky_task.infra(make_spec({"cloud": "any"})) is None
    with pytest.raises(ProviderError, match="local provider"):
        sky_task.infra(make_spec({"cloud": "local"}, storage=None))


def test_tpu_gets_its_runtime() -> None:
    res = translate(make_spec(INLINE["gcp-tpu-v5e"]))["resources"]
    assert res["accelerator_args"] == {"runtime_version": "v2-alpha-tpuv5-lite"}
    assert res["infra"] == "gcp/us-west4/us-west4-a"


def test_zero_price_cap_is_infeasible() -> None:
    with pytest.raises(PlanInfeasible):
        translate(make_spec({"cloud": "aws", "max_hourly_usd": 0}))


def test_wheel_name_is_checked() -> None:
    with pytest.raises(ProviderError, match="wheel"):
        sky_task.task_config(make_spec({"cloud": "aws"}), attempt=1, env={}, job_file="/x/job.json",
                             wheel="/tmp/evil;rm -rf ~.whl")


def test_no_secret_reaches_the_task(monkeypatch: pytest.MonkeyPatch, sky_home: Path) -> None:  # noqa: F811
    import sky

    sentinel = "sentinel-9f2c1e7d-do-not-ship"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", sentinel + "-id")
    monkeypatch.setenv("HF_TOKEN", sentinel + "-hf")
    env = {"OPTJOB_API_TOKEN": sentinel, "OPTJOB_COPIED": sentinel, "AWS_SECRET_ACCESS_KEY": sentinel,
           "OPTJOB_DEADLINE": "1900000000", "OPTJOB_MULTI": "a\nb"}
    for _, spec in CASES:
        config = translate(spec, env=env)
        dumped = sky_task.dump_yaml(config)
        assert "sentinel" not in dumped
        assert all(k.startswith("OPTJOB_") for k in config["envs"])
        task = sky.Task.from_yaml_config(yaml.safe_load(dumped))
        assert "sentinel" not in yaml.safe_dump(task.to_yaml_config())


def test_build_wheel(tmp_path: Path) -> None:
    wheel = sky_task.build_wheel(dest=tmp_path)
    assert wheel.name.startswith("optjob-") and wheel.suffix == ".whl"
    with pytest.raises(ProviderError, match="source tree"):
        sky_task.build_wheel(source=tmp_path)


FAKE_EXE = """#!/bin/bash
echo "$(basename "$0") args: $*"
trap 'echo got-term; exit 143' TERM
touch "$HOME/started"
for _ in $(seq 200); do sleep 0.05; done
exit "${FAKE_RC:-0}"
"""


def _node(tmp_path: Path, **env: str) -> tuple[Path, dict[str, str]]:
    """A fake node HOME whose venv 'python' / 'torchrun' are small bash stand-ins."""
    home = tmp_path / "node"
    bindir = home / "optjob-venv" / "bin"
    bindir.mkdir(parents=True)
    for name in ("python", "torchrun"):
        (bindir / name).write_text(FAKE_EXE)
        (bindir / name).chmod(0o755)
    script = home / "run.sh"
    script.write_text(sky_task.run_script())
    return script, {"PATH": "/usr/bin:/bin", "HOME": str(home), **env}


def test_run_script_reports_exit_code(tmp_path: Path) -> None:
    script, env = _node(tmp_path, FAKE_RC="3")
    (tmp_path / "node" / "optjob-venv" / "bin" / "python").write_text(
        FAKE_EXE.replace('for _ in $(seq 200); do sleep 0.05; done\n', ""))
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert f"python args: -u -m optjob.steps run {env['HOME']}/optjob-job" in proc.stdout
    assert proc.stdout.strip().endswith(f"{sky_task.EXIT_MARKER} 3")


def test_run_script_forwards_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    script, env = _node(tmp_path)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    started = Path(env["HOME"]) / "started"
    for _ in range(200):
        if started.exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # bash alone, as a supervisor might
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "asking the workload to checkpoint" in out and "got-term" in out
    assert out.strip().endswith(f"{sky_task.EXIT_MARKER} 143")


def test_run_script_multi_node_uses_torchrun(tmp_path: Path) -> None:
    script, env = _node(tmp_path, SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2",
                        SKYPILOT_NODE_RANK="1", SKYPILOT_NUM_GPUS_PER_NODE="8")
    (tmp_path / "node" / "optjob-venv" / "bin" / "torchrun").write_text("#!/bin/bash\necho \"torchrun $*\"\n")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout
    assert ("torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.0.0.1 "
            f"--master_port=29500 -m optjob.steps run {env['HOME']}/optjob-job") in proc.stdout


def test_local_inputs_are_mounted(tmp_path: Path, sky_home: Path) -> None:  # noqa: F811
    import sky

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello")
    job = {"spec": {"model": {"path": str(tmp_path / "missing-model"), "tokenizer": "builtin"},
                    "data": {"source": str(corpus)}}}
    mounts = sky_task.input_mounts(job)
    assert mounts == {str(corpus): str(corpus)}
    config = sky_task.task_config(make_spec({"cloud": "aws"}), attempt=1, env={}, job_file="/tmp/x/job.json",
                                  wheel="/tmp/optjob-0.1.0-py3-none-any.whl", inputs=mounts)
    assert config["file_mounts"][str(corpus)] == str(corpus)
    assert str(corpus) in (sky.Task.from_yaml_config(config).file_mounts or {})


def test_run_script_one_node_several_gpus_uses_torchrun(tmp_path: Path) -> None:
    script, env = _node(tmp_path, SKYPILOT_NUM_GPUS_PER_NODE="4")
    (tmp_path / "node" / "optjob-venv" / "bin" / "torchrun").write_text("#!/bin/bash\necho \"torchrun $*\"\n")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchrun --nnodes=1 --node_rank=0 --nproc_per_node=4 --master_addr=127.0.0.1" in proc.stdout


def test_run_script_prefers_the_workloads_own_exit_code_over_torchruns(tmp_path: Path) -> None:
    """torchrun exits 1 when any worker exits non-zero; rank 0's exit-code file (written by
    ``python -m optjob.steps``) keeps a graceful stop (143) from reading as a failure."""
    script, env = _node(tmp_path, SKYPILOT_NUM_GPUS_PER_NODE="2")
    job = tmp_path / "node" / "optjob-job"
    job.mkdir(parents=True)
    (tmp_path / "node" / "optjob-venv" / "bin" / "torchrun").write_text(
        f"#!/bin/bash\necho 143 > {job}/exit-code\nexit 1\n")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 143
    assert proc.stdout.strip().endswith(f"{sky_task.EXIT_MARKER} 143")
