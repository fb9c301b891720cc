"""Spec -> SkyPilot task config (a plain dict, the task-YAML schema of SkyPilot 0.14).

``task_config`` is pure: no SkyPilot import, no I/O, so it is cheap to test and
its output can be dumped as YAML for ``optjob plan`` or a bug report.
``build_task`` / ``build_resources`` turn the dict into the real ``sky.Task`` /
``sky.Resources`` (SkyPilot validates it there); they import ``sky`` lazily.

What reaches the node: the job's ``job.json`` and the optjob wheel (file_mounts),
non-secret ``OPTJOB_*`` environment variables, a setup script that installs the
workload, and a run script that starts ``python -m optjob.steps run`` (through
torchrun across nodes). Never credentials: the node reaches the bucket through
its cloud identity (an instance profile / service account).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from optjob.specs import JobSpec
from optjob.specs.errors import PlanInfeasible, ProviderError

if TYPE_CHECKING:
    import sky

#: Where the job folder and the wheel land on the node (SkyPilot expands ``~``).
REMOTE_JOB_DIR = "~/optjob-job"
REMOTE_WHEEL_DIR = "~/optjob-dist"
REMOTE_VENV = "$HOME/optjob-venv"
EXIT_MARKER = "[optjob] exit-code"
TORCH_SPEC = "torch>=2.4,<3"
#: SkyPilot infra names for optjob's cloud names (``any`` = let SkyPilot choose).
_INFRA = {"aws": "aws", "gcp": "gcp", "azure": "azure", "lambda": "lambda", "runpod": "runpod",
          "kubernetes": "k8s", "any": "*"}
#: TPU VM runtimes SkyPilot would otherwise guess (its default for v5e is the v5p image).
_TPU_RUNTIME = {"tpu-v5litepod": "v2-alpha-tpuv5-lite", "tpu-v5p": "v2-alpha-tpuv5",
                "tpu-v6e": "v2-alpha-tpuv6e", "tpu-v4": "tpu-ubuntu2204-base"}
_SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|SESSION|COOKIE|PRIVATE", re.I)
_ENV_NAME = re.compile(r"^OPTJOB_[A-Z0-9_]{1,64}$")


def uses_managed_jobs(spec: JobSpec) -> bool:
    """Spot (true or auto) runs as a SkyPilot managed job, so preemptions relaunch."""
    return spec.resources.spot is not False


def infra(spec: JobSpec) -> str | None:
    """``aws/us-east-1/us-east-1a``-style infra, ``*`` for any part left open."""
    res = spec.resources
    if res.cloud == "local":
        raise ProviderError("cloud: local runs with the local provider, not SkyPilot; "
                            "set resources.cloud to aws, gcp, azure, lambda, runpod, kubernetes or any")
    parts = [_INFRA[res.cloud], res.region or ("*" if res.zone else None), res.zone]
    parts = [p for p in parts if p is not None]
    return None if parts == ["*"] else "/".join(parts)


def _accelerator_candidates(spec: JobSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, count in spec.resources.accelerator_choices:
        cand: dict[str, Any] = {"accelerators": {name: count}}
        runtime = next((v for k, v in _TPU_RUNTIME.items() if name.startswith(k + "-")), None)
        if runtime:
            cand["accelerator_args"] = {"runtime_version": runtime}
        out.append(cand)
    return out or [{}]


def resources_config(spec: JobSpec) -> dict[str, Any]:
    """The ``resources:`` section. Several accelerators become ``any_of`` (SkyPilot
    picks the cheapest feasible); ``spot: auto`` adds an on-demand twin of each
    candidate, ``ordered`` spot-first when there is one accelerator choice."""
    res = spec.resources
    common: dict[str, Any] = {"autostop": {"idle_minutes": res.autostop_minutes, "down": True}}
    where = infra(spec)
    if where:
        common["infra"] = where
    if res.cpus:
        common["cpus"] = f"{res.cpus}+"
    if res.memory:
        common["memory"] = f"{_num(res.memory)}+"
    if res.disk_gb:
        common["disk_size"] = math.ceil(res.disk_gb)
    if res.max_hourly_usd is not None:
        # SkyPilot's cap is per instance (spot price when use_spot); optjob's is for all nodes.
        per_node = math.floor(res.max_hourly_usd / res.nodes * 10_000) / 10_000
        if per_node <= 0:
            raise PlanInfeasible(f"resources.max_hourly_usd: ${res.max_hourly_usd} allows no offer")
        common["max_hourly_cost"] = per_node
    spots = [True, False] if res.spot == "auto" else [bool(res.spot)]
    cands = [{**c, "use_spot": s} for s in spots for c in _accelerator_candidates(spec)]
    if len(cands) == 1:
        return {**common, **cands[0]}
    key = "ordered" if res.spot == "auto" and len(res.accelerator_choices) <= 1 else "any_of"
    return {**common, key: cands}


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 3)


def node_env(spec: JobSpec, attempt: int, env: Mapping[str, str]) -> dict[str, str]:
    """Environment for the node: only ``OPTJOB_*`` names, never anything secret-looking."""
    secrets = {v for k, v in os.environ.items() if _SECRETISH.search(k) and len(v) >= 8}
    out = {k: str(v) for k, v in env.items()
           if _ENV_NAME.match(k) and not _SECRETISH.search(k) and "\n" not in str(v)
           and str(v) not in secrets}
    out.update(OPTJOB_JOB=spec.name, OPTJOB_ATTEMPT=str(attempt),
               OPTJOB_STORAGE=spec.storage.artifacts or "")
    out.setdefault("OPTJOB_DEADLINE", "")
    return dict(sorted(out.items()))


def setup_script(spec: JobSpec, wheel_name: str) -> str:
    """Install optjob and its workload into a venv on every node (idempotent)."""
    names = [n.lower() for n, _ in spec.resources.accelerator_choices]
    if any(n.startswith("tpu-") for n in names):
        torch = ("'torch_xla[tpu]' -f https://storage.googleapis.com/libtpu-releases/index.html")
    elif names:
        torch = shlex.quote(TORCH_SPEC)  # PyPI's Linux wheels carry CUDA
    else:
        torch = f"{shlex.quote(TORCH_SPEC)} --index-url https://download.pytorch.org/whl/cpu"
    extras = "workload"
    wheel = f'"$HOME"/optjob-dist/{shlex.quote(f"{wheel_name}[{extras}]")}'
    pip = f'"{REMOTE_VENV}/bin/python" -m pip install -q'
    lines = [
        "set -euo pipefail",
        f'[ -x "{REMOTE_VENV}/bin/python" ] || python3 -m venv "{REMOTE_VENV}"',
        f"{pip} --upgrade pip",
        f"{pip} {torch}",
        f"{pip} {wheel}",
    ]
    if spec.storage.is_remote:
        lines.append(f"{pip} 'boto3>=1.34'")
    return "\n".join(lines) + "\n"


def run_script() -> str:
    """Start the workload (torchrun across nodes) and forward SIGTERM to it, so a
    cancel lets it checkpoint; the exit-code line lets ``poll`` tell a graceful
    stop (4 / 143) from a failure."""
    job = '"$HOME/optjob-job"'
    return "\n".join([
        "set -u",
        'cd "$HOME"',
        f'rm -f {job}/exit-code',
        'nproc="${SKYPILOT_NUM_GPUS_PER_NODE:-1}"; [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1',
        'if [ "${SKYPILOT_NUM_NODES:-1}" -gt 1 ] || [ "$nproc" -gt 1 ]; then',
        '  head_ip=$(echo "${SKYPILOT_NODE_IPS:-127.0.0.1}" | head -n1)',
        f'  "{REMOTE_VENV}/bin/torchrun" --nnodes="${{SKYPILOT_NUM_NODES:-1}}"'
        ' --node_rank="${SKYPILOT_NODE_RANK:-0}" --nproc_per_node="$nproc"'
        f' --master_addr="$head_ip" --master_port=29500 -m optjob.steps run {job} &',
        "else",
        f'  "{REMOTE_VENV}/bin/python" -u -m optjob.steps run {job} &',
        "fi",
        "child=$!",
        "trap 'echo \"[optjob] SIGTERM: asking the workload to checkpoint\"; kill -TERM $child' TERM",
        'wait "$child"; rc=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done',
        # Under torchrun any failing worker makes rc 1; each node's local rank 0 records its own status.
        f'if [ -s {job}/exit-code ]; then rc=$(cat {job}/exit-code); fi',
        f'echo "{EXIT_MARKER} $rc"',
        "exit $rc",
    ]) + "\n"


def exit_code_from_log(text: str) -> int | None:
    """The workload's exit status from the run script's marker lines (first non-zero wins)."""
    codes = []
    for line in text.splitlines():
        at = line.find(EXIT_MARKER)
        if at >= 0:
            word = line[at + len(EXIT_MARKER):].split()
            if word and word[0].lstrip("-").isdigit():
                codes.append(int(word[0]))
    return next((c for c in codes if c != 0), 0) if codes else None


#: SkyPilot's status lines in a log stream (ANSI codes stripped first); they are not the job's output.
_NOISE = re.compile(r"INFO: Waiting \d+s for the logs|ERROR: Logs for |Job finished \(status: |^Failure reason: "
                    r"|not found \(see `sky queue`\)|^Job \d+ not found|Skip streaming logs|^No logs found for job"
                    r"|is already in terminal state|Waiting for task resources on ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def job_output(text: str) -> str:
    """A SkyPilot log stream without its status lines (see ``SkyClient.logs``)."""
    lines = text.splitlines(keepends=True)
    return "".join(line for line in lines if not _NOISE.search(_ANSI.sub("", line).strip()))


def input_mounts(job: Mapping[str, Any]) -> dict[str, str]:
    """Local inputs that ``job.json`` names (model.path, model.tokenizer, data.source, made absolute
    by the manager), mounted at the same path on the node so job.json stays valid there."""
    spec = job.get("spec") or {}
    model, data = spec.get("model") or {}, spec.get("data") or {}
    paths = (model.get("path"), model.get("tokenizer"), data.get("source"))
    return {p: p for p in paths if isinstance(p, str) and p.startswith("/") and Path(p).exists()}


def task_config(spec: JobSpec, *, attempt: int, env: Mapping[str, str], job_file: str | Path, wheel: str | Path,
                inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The whole task, as SkyPilot's task YAML would hold it (``inputs``: extra file_mounts)."""
    wheel_name = Path(wheel).name
    if not re.match(r"^[A-Za-z0-9_.+-]+\.whl$", wheel_name):
        raise ProviderError(f"{wheel_name!r} is not a wheel file name")
    return {
        "name": f"optjob-{spec.name}",
        "num_nodes": spec.resources.nodes,
        "resources": resources_config(spec),
        "envs": node_env(spec, attempt, env),
        "file_mounts": {
            **dict(inputs or {}),
            f"{REMOTE_JOB_DIR}/job.json": str(job_file),
            f"{REMOTE_WHEEL_DIR}/{wheel_name}": str(wheel),
        },
        "setup": setup_script(spec, wheel_name),
        "run": run_script(),
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(config: Mapping[str, Any]) -> str:
    """Task YAML as ``sky launch task.yaml`` would read it (scripts as literal blocks)."""
    return yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def build_task(config: Mapping[str, Any]) -> sky.Task:
    """The real ``sky.Task``; SkyPilot validates the config against its schema."""
    import sky

    return sky.Task.from_yaml_config(dict(config))


def build_resources(config: Mapping[str, Any]) -> list[sky.Resources]:
    """One ``sky.Resources`` per candidate, built through the constructor."""
    import sky

    res = dict(config["resources"])
    cands = res.pop("any_of", None) or res.pop("ordered", None) or [{}]
    return [sky.Resources(**{**res, **c}) for c in cands]


def build_wheel(source: Path | None = None, dest: Path | None = None) -> Path:
    """``pip wheel --no-deps`` of the optjob checkout this module lives in (built from
    a temporary copy, so the checkout gets no build/ folder)."""
    root = source or Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ProviderError(f"no optjob source tree at {root} to build a wheel from; "
                            "pass SkyPilotProvider(wheel=PATH) with a built optjob wheel")
    out = dest or Path(tempfile.mkdtemp(prefix="optjob-wheel-"))
    with tempfile.TemporaryDirectory(prefix="optjob-src-") as tmp:
        src = Path(tmp) / "src"
        skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "tests",
                                      "benchmarks", "docs")
        shutil.copytree(root, src, ignore=skip)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
               "-w", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(out.glob("optjob-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ProviderError(f"building the optjob wheel failed: {proc.stderr.strip()[-500:]}")
    return wheels[-1]
