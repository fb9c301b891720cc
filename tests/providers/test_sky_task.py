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
            assert r.autostop_config.idle_minutes == sky_task.autostop_idle_minutes(spec) and r.autostop_config.down
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
    installs = [line for line in config["setup"].splitlines() if line.startswith("pip ")]
    assert ("torch_xla" in installs[0]) == tpu
    assert installs[1].startswith('pip "$HOME/optjob-dist/optjob-0.1.0-py3-none-any.whl[workload]"')
    assert ("boto3==" in installs[1]) == (spec.storage.scheme == "s3")


def test_a100_spot_translation() -> None:
    config = translate(make_spec(INLINE["aws-a100x8-spot"]))
    assert config["resources"] == {
        "autostop": {"idle_minutes": 1, "down": True},
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


# ------------------------------------------------------------------ the node's pinned environment

def _installs(config: dict[str, Any]) -> list[list[str]]:
    import shlex

    return [shlex.split(line)[1:] for line in config["setup"].splitlines() if line.startswith("pip ")]


@pytest.mark.parametrize(("accelerators", "index"), [
    (None, "https://download.pytorch.org/whl/cpu"),
    ("A100:8", "https://download.pytorch.org/whl/cu128"),
    (["H100:8", "B200:8"], "https://download.pytorch.org/whl/cu128"),
    ("V100:4", "https://download.pytorch.org/whl/cu126"),
    (["A100:1", "V100:1"], "https://download.pytorch.org/whl/cu126"),
    ("MI300X:8", "https://download.pytorch.org/whl/rocm6.4"),
])
def test_setup_pins_torch_from_the_index_its_accelerator_needs(accelerators: Any, index: str) -> None:
    from optjob.providers import node_lock

    _, pins = node_lock.load()
    res = {"cloud": "aws", **({"accelerators": accelerators} if accelerators else {})}
    first, second = _installs(translate(make_spec(res)))
    assert first == [f"torch=={pins['torch']}", "--extra-index-url", index]
    assert second[1:] == [f"boto3=={pins['boto3']}"]


def test_tpu_nodes_get_the_torch_and_torch_xla_pair() -> None:
    """Before, the TPU node installed torch_xla alone (no torch pinned beside it)."""
    from optjob.providers import node_lock

    _, pins = node_lock.load()
    first, _ = _installs(translate(make_spec(INLINE["gcp-tpu-v5e"], storage="gs://bkt/jobs")))
    version = pins["torch"]
    assert first[:2] == [f"torch=={version}", f"torch_xla[tpu]=={version}"]
    assert "-f" in first and sky_task.TPU_WHEELS in first


@pytest.mark.parametrize(("url", "sdk"), [("s3://bkt/p", "boto3"), ("gs://bkt/p", "google-cloud-storage"),
                                          ("az://ctr/p", "azure-storage-blob"), (None, None)])
def test_the_node_installs_the_sdk_of_its_bucket_pinned(url: str | None, sdk: str | None) -> None:
    from optjob.providers import node_lock

    python, pins = node_lock.load()
    config = translate(make_spec({"cloud": "aws"}, storage=url))
    _, second = _installs(config)
    assert second[1:] == ([f"{sdk}=={pins[sdk]}"] if sdk else [])
    # The whole lock reaches the node as pip constraints, its python version with it.
    assert f"want={python};" in config["setup"] and "-c \"$lock\"" in config["setup"]
    assert all(f"{name}=={version}" in config["setup"] for name, version in pins.items())


def test_a_prebuilt_image_skips_setup(tmp_path: Path, sky_home: Path) -> None:  # noqa: F811
    import sky

    spec = make_spec({"cloud": "aws", "accelerators": "A100:1", "image": "ghcr.io/acme/optjob:0.1.0"})
    config = translate(spec)
    assert "setup" not in config and not any(k.startswith(sky_task.REMOTE_WHEEL_DIR) for k in config["file_mounts"])
    assert config["resources"]["image_id"] == "docker:ghcr.io/acme/optjob:0.1.0"
    task = sky.Task.from_yaml_config(yaml.safe_load(sky_task.dump_yaml(config)))
    assert task.setup is None and next(iter(task.resources)).image_id == {None: "docker:ghcr.io/acme/optjob:0.1.0"}
    # The run script then uses the image's python3.
    home = tmp_path / "node"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "python3").write_text("#!/bin/bash\necho \"image python3 $*\"\n")
    (home / "bin" / "python3").chmod(0o755)
    script = home / "run.sh"
    script.write_text(config["run"])
    proc = subprocess.run(["bash", str(script)], env={"PATH": f"{home / 'bin'}:/usr/bin:/bin", "HOME": str(home)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and f"image python3 -u -m optjob.steps run {home}/optjob-job" in proc.stdout


def test_the_setup_requirements_resolve_offline_against_the_lock(tmp_path: Path) -> None:
    """The real ``pip install --dry-run --no-index`` of what the setup script installs (the optjob wheel with
    its workload extra, torch, each bucket SDK), under the lock's constraints, against this environment (the
    one the tests pass in): a pin that contradicts optjob's requirements, or one this environment does not
    have, makes pip fail, so a broken lock fails CI."""
    import json as _json
    import sys

    from optjob.providers import node_lock

    python, pins = node_lock.load()
    assert python == f"{sys.version_info[0]}.{sys.version_info[1]}", "the lock was made with another python"
    wheel = sky_task.build_wheel(dest=tmp_path / "dist")
    reqs: list[str] = []
    for url in ("s3://bkt/p", "gs://bkt/p", "az://ctr/p"):
        for args in sky_task.node_requirements(make_spec({"cloud": "aws", "accelerators": "A100:1"}, storage=url),
                                               wheel.name, pins):
            words = [a for i, a in enumerate(args) if not a.startswith("-") and not (i and args[i - 1].startswith("-"))]
            reqs += [f"optjob[workload] @ {wheel.as_uri()}" if w == f"$HOME/optjob-dist/{wheel.name}[workload]" else w
                     for w in words]
    assert f"torch=={pins['torch']}" in reqs and any(r.startswith("optjob[workload] @ ") for r in reqs)
    lock = tmp_path / "lock.txt"
    lock.write_text(node_lock.LOCK_FILE.read_text())
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "-c", str(lock), "--report", str(report), *sorted(set(reqs))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    would = {item["metadata"]["name"].lower(): item["metadata"]["version"]
             for item in _json.loads(report.read_text())["install"]}
    assert set(would) <= {"optjob"}, would  # everything else is here, at the locked version


def test_the_shipped_lock_is_this_environment() -> None:
    from optjob.providers import node_lock

    assert node_lock.parse(node_lock.LOCK_FILE.read_text()) == node_lock.parse(node_lock.generate()), \
        "run: python -m optjob.providers.node_lock --write"
    assert node_lock.main(["--check"]) == 0


def test_a_wheel_from_the_installed_files(tmp_path: Path) -> None:
    """An installed optjob (no source tree) still ships itself: the wheel is made from its files."""
    import sys

    built = sky_task.build_wheel(dest=tmp_path / "dist")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(built)], check=True, timeout=300)
    (info,) = site.glob("optjob-*.dist-info")
    remade = sky_task.wheel_from_installed(site / "optjob", info, dest=tmp_path / "remade")
    assert remade.name == built.name
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(again),
                    str(remade)], check=True, timeout=300)

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "optjob").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}

    assert "optjob/providers/data/node-lock.txt" in tree(site)
    assert sorted(tree(again)) == sorted(tree(site)) and tree(again) == tree(site)
    probe = "import optjob.providers.sky_task as t, optjob.steps.storage as s; print(t.__file__); print(s.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": str(again)})
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(again)) for line in out.stdout.split()), out.stdout  # the wheel's own files
    entry = (next(again.glob("optjob-*.dist-info")) / "entry_points.txt").read_text()
    assert "optjob = optjob.manager.cli:main" in entry
    with pytest.raises(ProviderError, match="no installed optjob"):
        sky_task.wheel_from_installed(tmp_path / "nothing", info, dest=tmp_path / "x")


# ------------------------------------------------------------------ env and secrets

def test_env_and_secrets_reach_the_task_through_skypilots_own_mechanism(sky_home: Path) -> None:  # noqa: F811
    import sky

    doc = {"cloud": "aws", "accelerators": "A100:1"}
    spec = make_spec(doc).model_copy(update={"env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                                             "secrets": ["HF_TOKEN", "WANDB_API_KEY"]})
    values = {"HF_TOKEN": "hf-sentinel-31c9", "WANDB_API_KEY": "wandb-sentinel-77aa"}
    config = sky_task.task_config(spec, attempt=1, env={}, job_file="/tmp/x/job.json",
                                  wheel="/tmp/optjob-0.1.0-py3-none-any.whl", secrets=values)
    assert config["envs"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    task = sky_task.build_task(config)
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == values
    assert "HF_TOKEN" not in task.envs
    # What SkyPilot keeps and shows of the task (its user-specified YAML) holds no value; what it sends
    # to the node (its full config) does.
    assert "sentinel" not in yaml.safe_dump(task.to_yaml_config(use_user_specified_yaml=True))
    assert task.to_yaml_config()["secrets"] == values
    # Without values (plan --sky-task): null secrets, which `sky launch --secret NAME` fills from the environment.
    shown = sky_task.dump_yaml(translate(spec))
    assert "sentinel" not in shown and yaml.safe_load(shown)["secrets"] == {"HF_TOKEN": None, "WANDB_API_KEY": None}
    relaunched = sky.Task.from_yaml_config(yaml.safe_load(shown), secrets_overrides=list(values.items()))
    assert {k: v.get_secret_value() for k, v in relaunched.secrets.items()} == values


def test_a_missing_secret_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.specs.errors import UsageError

    spec = make_spec({"cloud": "aws"}).model_copy(update={"secrets": ["HF_TOKEN", "WANDB_API_KEY"]})
    monkeypatch.setenv("HF_TOKEN", "x")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UsageError) as info:
        sky_task.require_secrets(spec, dict(__import__("os").environ))
    assert str(info.value).count("\n") == 0 and "WANDB_API_KEY is not set" in str(info.value)
    assert sky_task.require_secrets(spec, {"HF_TOKEN": "a", "WANDB_API_KEY": "b"}) == {"HF_TOKEN": "a",
                                                                                        "WANDB_API_KEY": "b"}


def test_a_spot_run_without_storage_is_refused_and_an_on_demand_one_comes_home() -> None:
    from pydantic import ValidationError

    for cloud, scheme in (("aws", "s3://"), ("gcp", "gs://"), ("azure", "az://")):
        with pytest.raises(ValidationError, match=f"spot cloud runs need storage.artifacts: {scheme}"):
            make_spec({"cloud": cloud, "spot": "auto"}, storage=None)
        on_demand = make_spec({"cloud": cloud, "autostop_minutes": 7}, storage=None)
        sky_task.check_outputs_kept(on_demand)  # its job folder is copied home before teardown
        assert sky_task.copies_home(on_demand)
        assert sky_task.autostop_idle_minutes(on_demand) == 7  # not 1: the copy needs the cluster a while
    kept = make_spec({"cloud": "gcp"}, storage="gs://bkt/p")
    sky_task.check_outputs_kept(kept)
    assert not sky_task.copies_home(kept) and sky_task.autostop_idle_minutes(kept) == 1


def test_setup_makes_a_venv_of_the_locks_python_once(tmp_path: Path) -> None:
    """The setup's first half (before any download) on this machine: the lock is written, the venv is made
    with the lock's Python, a venv of another Python is replaced, and a second run keeps the venv."""
    import shutil

    python3 = shutil.which("python3", path="/usr/bin:/bin")
    if python3 is None:
        pytest.skip("no system python3")
    version = subprocess.run([python3, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    setup = sky_task.setup_script(make_spec({"cloud": "aws"}), "optjob-0.1.0-py3-none-any.whl",
                                  lock=(version, {"torch": "2.13.0", "boto3": "1.0.0"}))
    assert setup is not None
    head = setup[:setup.index("pip() {")] + 'echo "venv: $("$venv/bin/python" -c "import sys; print(sys.prefix)")"\n'
    home = tmp_path / "node"
    venv = home / "optjob-venv"
    venv.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 2.7\n")  # a venv of another python: replaced
    (venv / "bin" / "python").chmod(0o755)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(["bash", "-c", head], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert f"venv: {venv}" in first.stdout
    assert (home / "optjob-dist" / "node-lock.txt").read_text().splitlines() == [
        f"# python {version}", "boto3==1.0.0", "torch==2.13.0"]
    stamp = (venv / "pyvenv.cfg").stat().st_mtime_ns
    again = subprocess.run(["bash", "-c", head], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (venv / "pyvenv.cfg").stat().st_mtime_ns == stamp  # kept
