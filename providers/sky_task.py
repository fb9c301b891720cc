"""Spec -> SkyPilot task config (a plain dict, the task-YAML schema of SkyPilot 0.14).

``task_config`` is pure: no SkyPilot import, no I/O, so it is cheap to test and
its output can be dumped as YAML for ``optjob plan`` or a bug report.
``build_task`` / ``build_resources`` turn the dict into the real ``sky.Task`` /
``sky.Resources`` (SkyPilot validates it there); they import ``sky`` lazily.

What reaches the node: the job's ``job.json`` and the optjob wheel (file_mounts),
non-secret ``OPTJOB_*`` environment variables and the spec's plain ``env``, the spec's
``secrets`` (values read from the manager's environment at launch, handed to SkyPilot as
task secrets, which it redacts in its own logs and YAML; ``task_config`` without
``secrets=`` leaves them null, which is also how ``optjob plan --sky-task`` prints them),
a setup script that installs the workload with the node lock's ``==`` pins (``node_lock``;
none with ``resources.image``), and a run script that starts ``python -m optjob.steps run``
(through torchrun across nodes). No other credential; SkyPilot itself uploads
local cloud credential files to the node unless ``remote_identity`` says otherwise
(sky/clouds/aws.py ``get_credential_file_mounts``; default ``LOCAL_CREDENTIALS``,
sky/utils/schemas.py ``get_default_remote_identity``).
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
from optjob.specs.errors import PlanInfeasible, ProviderError, UsageError
from optjob.specs.resources import storage_example

from . import node_lock

if TYPE_CHECKING:
    import sky

#: Where the job folder and the wheel land on the node (SkyPilot expands ``~``).
REMOTE_JOB_DIR = "~/optjob-job"
REMOTE_WHEEL_DIR = "~/optjob-dist"
REMOTE_VENV = "$HOME/optjob-venv"
EXIT_MARKER = "[optjob] exit-code"
#: PyTorch's wheel indexes: CUDA 12.8 builds run sm_75 (T4) and newer (A100, H100, L4, B200...); CUDA 12.6
#: builds still carry Volta and Pascal (V100, P100), which the 12.8 ones dropped. ROCm for AMD GPUs.
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
CUDA_TAG, OLD_CUDA_TAG, ROCM_TAG = "cu128", "cu126", "rocm6.4"
_OLD_GPUS = {"v100", "v100-32gb", "p100", "p4", "p40", "k80", "m60"}
_AMD_GPUS = re.compile(r"^(mi\d+|mi\d+x)", re.I)
TPU_WHEELS = "https://storage.googleapis.com/libtpu-releases/index.html"
#: The one package a node needs for each bucket scheme (its version from the node lock).
STORAGE_SDK = {"s3": "boto3", "gs": "google-cloud-storage", "az": "azure-storage-blob"}
#: SkyPilot infra names for optjob's cloud names (``any`` = let SkyPilot choose).
_INFRA = {"aws": "aws", "gcp": "gcp", "azure": "azure", "lambda": "lambda", "runpod": "runpod",
          "kubernetes": "k8s", "any": "*"}
#: TPU VM runtimes SkyPilot would otherwise guess (its default for v5e is the v5p image).
_TPU_RUNTIME = {"tpu-v5litepod": "v2-alpha-tpuv5-lite", "tpu-v5p": "v2-alpha-tpuv5",
                "tpu-v6e": "v2-alpha-tpuv6e", "tpu-v4": "tpu-ubuntu2204-base"}
#: The stop flag in the job's storage (``OPTJOB_STORAGE``): the manager writes it to ask for a stop
#: ({"first_attempt": A, "attempt": N}: nodes started as attempts A..N obey it; a later run's do not),
#: the run script's watcher polls it every ``STOP_FLAG_POLL_S`` and SIGTERMs the workload, which
#: checkpoints, uploads and exits 143. SkyPilot's own cancel would remove the node at once.
STOP_FLAG_KEY = "control/stop.json"
STOP_FLAG_POLL_S = 15.0
#: With ``teardown: always`` a cluster goes down this many idle minutes after its job ends (the job
#: is all it is for; a manager looking reads the end within a tick, one away reads the storage).
FINAL_IDLE_MINUTES = 1
#: SkyPilot's skylet checks autostop every 60 s (sky/skylet/events.py:268-283 StopEvent
#: EVENT_INTERVAL_SECONDS); the managed-job controller checks its job every 15 s
#: (sky/jobs/utils.py:95 JOB_STATUS_CHECK_GAP_SECONDS); terminating the instances then takes up to:
AUTOSTOP_CHECK_S, MANAGED_CHECK_S, TERMINATE_S = 60.0, 15.0, 150.0
_SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|SESSION|COOKIE|PRIVATE", re.I)
_ENV_NAME = re.compile(r"^OPTJOB_[A-Z0-9_]{1,64}$")


def uses_managed_jobs(spec: JobSpec) -> bool:
    """Spot (true or auto) runs as a SkyPilot managed job, so preemptions relaunch."""
    return spec.resources.spot is not False


def autostop_idle_minutes(spec: JobSpec) -> int:
    """The autostop the cluster is launched with: ``FINAL_IDLE_MINUTES`` when teardown is ``always``
    (nothing is kept for later, so after the workload's exit at its deadline the node goes down within
    minutes with no manager alive), else the spec's ``autostop_minutes`` (kept for inspection, or for the
    copy home of a run without storage, which a one-minute autostop could cut short)."""
    if spec.teardown == "always" and not copies_home(spec):  # a copy home needs the cluster until it is done
        return min(FINAL_IDLE_MINUTES, spec.resources.autostop_minutes)
    return spec.resources.autostop_minutes


def unattended_end_s(spec: JobSpec) -> float:
    """Seconds from the workload's exit until its nodes are gone with no manager alive: a managed job's
    controller notices the end and terminates its cluster; a cluster idles ``autostop_idle_minutes``,
    waits for the skylet's next autostop check, then terminates. The manager's deadline for the node
    leaves this much before the cap (``manager.meter.teardown_margin_s``)."""
    if uses_managed_jobs(spec):
        return MANAGED_CHECK_S + TERMINATE_S
    return autostop_idle_minutes(spec) * 60.0 + AUTOSTOP_CHECK_S + TERMINATE_S


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
    common: dict[str, Any] = {"autostop": {"idle_minutes": autostop_idle_minutes(spec), "down": True}}
    where = infra(spec)
    if where:
        common["infra"] = where
    if res.cpus:
        common["cpus"] = f"{res.cpus}+"
    if res.memory:
        common["memory"] = f"{_num(res.memory)}+"
    if res.disk_gb:
        common["disk_size"] = math.ceil(res.disk_gb)
    if res.image:
        common["image_id"] = f"docker:{res.image}"
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
    out.update(spec.env)  # the spec's plain variables (the validator refuses secret-looking names)
    out.update(OPTJOB_JOB=spec.name, OPTJOB_ATTEMPT=str(attempt),
               OPTJOB_STORAGE=spec.storage.artifacts or "")
    if spec.storage.endpoint_url:
        out["OPTJOB_STORAGE_ENDPOINT"] = spec.storage.endpoint_url
    out.setdefault("OPTJOB_DEADLINE", "")
    return dict(sorted(out.items()))


def copies_home(spec: JobSpec) -> bool:
    """An on-demand cloud run without ``storage.artifacts``: its job folder (results, final models, logs;
    not checkpoints) is copied home from the cluster before teardown (``providers.home_copy``)."""
    return not spec.storage.artifacts and not uses_managed_jobs(spec)


def check_outputs_kept(spec: JobSpec) -> None:
    """No cloud run loses its outputs: the node pushes results, models and checkpoints to
    ``storage.artifacts`` (a bucket, or a folder the nodes share at the same path); an on-demand run
    without one has its job folder copied home before teardown (``copies_home``). A managed (spot) run
    without storage is refused (validation already says so), naming the scheme that fits the cloud:
    its controller removes the cluster, with no moment to copy from."""
    if spec.storage.artifacts or copies_home(spec):
        return
    raise UsageError(f"{spec.name}: a spot run keeps its results, final model and checkpoints in storage.artifacts, "
                     f"and it has none: set storage.artifacts: {storage_example(spec.resources.cloud)} (SkyPilot "
                     "removes a spot cluster on its own), use spot: false, or run on this machine with --local")


def require_secrets(spec: JobSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The values of the spec's ``secrets`` in ``environ`` (the manager's environment); one line naming
    every missing one otherwise."""
    missing = [name for name in spec.secrets if not environ.get(name)]
    if missing:
        them = "it" if len(missing) == 1 else "them"
        raise UsageError(f"secrets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set in this "
                         f"environment; export {them} where you run optjob (or remove {them} from secrets:)")
    return {name: environ[name] for name in spec.secrets}


def torch_index(spec: JobSpec) -> str | None:
    """The PyTorch wheel index for the spec's accelerators (None: TPU, whose torch_xla pairs with the CPU build)."""
    names = [n.lower() for n, _ in spec.resources.accelerator_choices]
    if any(n.startswith("tpu-") for n in names):
        return None
    if not names:
        return TORCH_INDEX.format(tag="cpu")
    if all(_AMD_GPUS.match(n) for n in names):
        return TORCH_INDEX.format(tag=ROCM_TAG)
    if any(n in _OLD_GPUS for n in names):
        return TORCH_INDEX.format(tag=OLD_CUDA_TAG)  # one build for every candidate: the one the oldest runs
    return TORCH_INDEX.format(tag=CUDA_TAG)


def node_requirements(spec: JobSpec, wheel_name: str, pins: Mapping[str, str]) -> list[list[str]]:
    """The pip install arguments of the setup script, one list per ``pip install`` (all under the lock's
    constraints): torch first (from the index its accelerator needs; on TPUs ``torch==X`` with
    ``torch_xla[tpu]==X``), then the optjob wheel with its workload and the bucket's SDK, ``==`` pinned."""
    torch = pins.get("torch")
    if not torch:
        raise ProviderError("the node lock pins no torch: regenerate it (python -m optjob.providers.node_lock --write)")
    index = torch_index(spec)
    if index is None:
        first = [f"torch=={torch}", f"torch_xla[tpu]=={torch}", "--extra-index-url", TORCH_INDEX.format(tag="cpu"),
                 "-f", TPU_WHEELS]
    else:
        first = [f"torch=={torch}", "--extra-index-url", index]
    tasks = any(getattr(s, "tasks", None) for s in [*spec.pipeline, *(s for v in spec.variants.values() for s in v)])
    second = [f"$HOME/optjob-dist/{wheel_name}[workload{',eval' if tasks else ''}]"]
    sdk = STORAGE_SDK.get(spec.storage.scheme or "")
    if sdk:
        if sdk not in pins:
            raise ProviderError(f"the node lock pins no {sdk}: regenerate it (python -m optjob.providers.node_lock "
                                "--write) where it is installed")
        second.append(f"{sdk}=={pins[sdk]}")
    return [first, second]


def _lock_text(pins: Mapping[str, str], python: str) -> str:
    return "\n".join([f"# python {python}", *(f"{k}=={v}" for k, v in sorted(pins.items()))])


def setup_script(spec: JobSpec, wheel_name: str, lock: tuple[str, dict[str, str]] | None = None) -> str | None:
    """Install optjob and its workload into a venv on every node, idempotently, with the node lock's
    ``==`` pins (its Python version too: uv brings one where the node has none). None with
    ``resources.image``: the image holds the workload."""
    if spec.resources.image:
        return None
    python, pins = lock or node_lock.load()
    if not re.match(r"^\d+\.\d+$", python):
        raise ProviderError(f"the node lock names python {python!r}")
    quoted = [" ".join(_shell_word(a) for a in args) for args in node_requirements(spec, wheel_name, pins)]
    venv = REMOTE_VENV
    lines = [
        "set -euo pipefail",
        f'want={python}; venv="{venv}"; lock="$HOME/optjob-dist/node-lock.txt"',
        'mkdir -p "$HOME/optjob-dist"',
        "cat > \"$lock\" <<'OPTJOB_LOCK'",
        _lock_text(pins, python),
        "OPTJOB_LOCK",
        "pyver() { \"$1\" -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null || true; }",
        'if [ "$(pyver "$venv/bin/python")" != "$want" ]; then',
        '  made=""',
        '  for py in "python$want" python3; do',
        '    rm -rf "$venv"',
        '    if command -v "$py" >/dev/null 2>&1 && [ "$(pyver "$py")" = "$want" ] && "$py" -m venv "$venv"; then',
        '      made=1; break',
        "    fi",
        "  done",
        '  if [ -z "$made" ]; then  # no python $want here: uv brings a standalone one',
        '    export PATH="$HOME/.local/bin:$PATH"',
        "    command -v uv >/dev/null 2>&1 || python3 -m pip install -q --user uv"
        " || curl -LsSf https://astral.sh/uv/install.sh | sh",
        '    rm -rf "$venv"; uv venv --seed --python "$want" "$venv"',
        "  fi",
        "fi",
        'pip() { "$venv/bin/python" -m pip install -q -c "$lock" "$@"; }',
        '"$venv/bin/python" -m pip install -q --upgrade pip',
        *(f"pip {q}" for q in quoted),
    ]
    return "\n".join(lines) + "\n"


def _shell_word(arg: str) -> str:
    """A pip argument for the script: ``$HOME/...`` (a checked wheel name) stays expandable, anything else
    is quoted."""
    if arg.startswith("$HOME/") and re.match(r"^[A-Za-z0-9_./+\[\]-]+$", arg[len("$HOME/"):]):
        return f'"{arg}"'
    return shlex.quote(arg)


#: The stop-flag watcher the run script starts beside the workload (see ``STOP_FLAG_KEY``).
STOP_WATCHER = f"""import json, os, signal, sys, time
pid, attempt = int(sys.argv[1]), int(os.environ.get("OPTJOB_ATTEMPT") or 0)
try:
    from optjob.steps.storage import open_storage
    store = open_storage(os.environ["OPTJOB_STORAGE"], endpoint_url=os.environ.get("OPTJOB_STORAGE_ENDPOINT") or None)
except Exception as exc:
    print(f"[optjob] the stop flag is not watched: {{exc}}", file=sys.stderr, flush=True)
    sys.exit(0)
while True:
    time.sleep(float(os.environ.get("OPTJOB_STOP_POLL_S") or {STOP_FLAG_POLL_S}))
    try:
        os.kill(pid, 0)
        flag = json.loads(store.get_bytes({STOP_FLAG_KEY!r}) or b"null")
        hit = isinstance(flag, dict) and int(flag["first_attempt"]) <= attempt <= int(flag["attempt"])
    except ProcessLookupError:
        sys.exit(0)
    except Exception:
        continue
    if hit:
        print("[optjob] stop requested: asking the workload to checkpoint", flush=True)
        os.kill(pid, signal.SIGTERM)
        sys.exit(0)
"""


def run_script() -> str:
    """Start the workload (torchrun across nodes) and forward SIGTERM to it, so a
    cancel lets it checkpoint; the exit-code line lets ``poll`` tell a graceful
    stop (4 / 143) from a failure. With ``OPTJOB_STORAGE`` a watcher beside it turns the
    manager's stop flag into that SIGTERM (``STOP_WATCHER``)."""
    job = '"$HOME/optjob-job"'
    return "\n".join([
        "set -u",
        'cd "$HOME"',
        f'rm -f {job}/exit-code',
        # The venv the setup made; with resources.image (no setup) the image's own python3 and torchrun.
        f'if [ -x "{REMOTE_VENV}/bin/python" ]; then py="{REMOTE_VENV}/bin/python"; trun="{REMOTE_VENV}/bin/torchrun";'
        ' else py=python3; trun=torchrun; fi',
        'nproc="${SKYPILOT_NUM_GPUS_PER_NODE:-1}"; [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1',
        'if [ "${SKYPILOT_NUM_NODES:-1}" -gt 1 ] || [ "$nproc" -gt 1 ]; then',
        '  head_ip=$(echo "${SKYPILOT_NODE_IPS:-127.0.0.1}" | head -n1)',
        '  "$trun" --nnodes="${SKYPILOT_NUM_NODES:-1}"'
        ' --node_rank="${SKYPILOT_NODE_RANK:-0}" --nproc_per_node="$nproc"'
        f' --master_addr="$head_ip" --master_port=29500 -m optjob.steps run {job} &',
        "else",
        f'  "$py" -u -m optjob.steps run {job} &',
        "fi",
        "child=$!",
        "trap 'echo \"[optjob] SIGTERM: asking the workload to checkpoint\"; kill -TERM $child' TERM",
        'watch=""',
        'if [ -n "${OPTJOB_STORAGE:-}" ]; then',
        "  cat > \"$HOME/optjob-stop-watch.py\" <<'OPTJOB_WATCH'",
        STOP_WATCHER.rstrip("\n"),
        "OPTJOB_WATCH",
        '  "$py" -u "$HOME/optjob-stop-watch.py" "$child" & watch=$!',
        "fi",
        'wait "$child"; rc=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done',
        '[ -n "$watch" ] && kill "$watch" 2>/dev/null',
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
    paths = [model.get("path"), model.get("tokenizer"), data.get("source")]
    paths += [str(Path(t).parent) for t in _task_files(spec)]  # a task file with its data files beside it
    return {p: p for p in paths if isinstance(p, str) and p.startswith("/") and Path(p).exists()}


def _task_files(spec: Mapping[str, Any]) -> list[str]:
    """The local lm-eval task files (``evaluate.tasks`` entries ending in .yaml) a job.json names."""
    steps = list(spec.get("steps") or [])
    steps += [s for e in steps if isinstance(e, dict) and "compare" in e for v in (e["compare"] or {}).values()
              for s in v]
    return [t for e in steps if isinstance(e, dict) for t in ((e.get("evaluate") or {}).get("tasks") or [])
            if isinstance(t, str) and t.lower().endswith((".yaml", ".yml"))]


def task_config(spec: JobSpec, *, attempt: int, env: Mapping[str, str], job_file: str | Path, wheel: str | Path,
                inputs: Mapping[str, str] | None = None, secrets: Mapping[str, str] | None = None,
                lock: tuple[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """The whole task, as SkyPilot's task YAML would hold it (``inputs``: extra file_mounts).

    ``secrets``: the values of ``spec.secrets`` (``require_secrets``); without them each is null, a
    secret SkyPilot resolves at launch (``sky launch --secret NAME`` takes it from the environment).
    ``build_task`` hands the values to SkyPilot apart from the YAML it keeps."""
    wheel_name = Path(wheel).name
    if not re.match(r"^[A-Za-z0-9_.+-]+\.whl$", wheel_name):
        raise ProviderError(f"{wheel_name!r} is not a wheel file name")
    config: dict[str, Any] = {
        "name": f"optjob-{spec.name}",
        "num_nodes": spec.resources.nodes,
        "resources": resources_config(spec),
        "envs": node_env(spec, attempt, env),
    }
    if spec.secrets:
        values = secrets or {}
        config["secrets"] = {name: values.get(name) for name in spec.secrets}
    config["file_mounts"] = {
        **dict(inputs or {}),
        f"{REMOTE_JOB_DIR}/job.json": str(job_file),
    }
    setup = setup_script(spec, wheel_name, lock)
    if setup is not None:  # with resources.image the image holds optjob: no wheel, no setup
        config["file_mounts"][f"{REMOTE_WHEEL_DIR}/{wheel_name}"] = str(wheel)
        config["setup"] = setup
    config["run"] = run_script()
    return config


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
    """The real ``sky.Task``; SkyPilot validates the config against its schema. Secret values go in
    as SkyPilot's ``secrets_overrides`` (what ``sky launch --secret`` does), so the YAML SkyPilot keeps
    of the task (and shows, and logs) holds none."""
    import sky

    config = dict(config)
    secrets = dict(config.get("secrets") or {})
    if secrets:
        config["secrets"] = dict.fromkeys(secrets)
    overrides = [(k, str(v)) for k, v in secrets.items() if v is not None]
    return sky.Task.from_yaml_config(config, secrets_overrides=overrides or None)


def build_resources(config: Mapping[str, Any]) -> list[sky.Resources]:
    """One ``sky.Resources`` per candidate, built through the constructor."""
    import sky

    res = dict(config["resources"])
    cands = res.pop("any_of", None) or res.pop("ordered", None) or [{}]
    return [sky.Resources(**{**res, **c}) for c in cands]


def build_wheel(source: Path | None = None, dest: Path | None = None) -> Path:
    """An optjob wheel for the node: ``pip wheel --no-deps`` of the checkout this module lives in (built
    from a temporary copy, so the checkout gets no build/ folder), or, in an installed optjob (no source
    tree), one made from the installed files (``wheel_from_installed``)."""
    root = source or Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        if source is None:
            return wheel_from_installed(dest=dest)
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


def _record_hash(data: bytes) -> str:
    import base64
    import hashlib

    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_from_installed(package_dir: Path | None = None, dist_info: Path | None = None,
                         dest: Path | None = None) -> Path:
    """A wheel of the installed optjob: its files (``package_dir``, default the ``optjob`` folder this
    module is in) and its metadata (``dist_info``, default the installed distribution's), with a fresh
    ``WHEEL`` and ``RECORD``. Pure Python, so ``py3-none-any``."""
    import zipfile
    from importlib import metadata

    package_dir = package_dir or Path(__file__).resolve().parents[1]
    if dist_info is not None:
        meta_text = (dist_info / "METADATA").read_text()
        entry = dist_info / "entry_points.txt"
        entry_points = entry.read_text() if entry.is_file() else None
    else:
        try:
            dist = metadata.distribution("optjob")
        except metadata.PackageNotFoundError:
            raise ProviderError("optjob is neither a source tree nor an installed distribution here",
                                hint="set OPTJOB_WHEEL=path/to/optjob.whl") from None
        meta_text, entry_points = dist.read_text("METADATA") or "", dist.read_text("entry_points.txt")
    version = next((line.split(":", 1)[1].strip() for line in meta_text.splitlines() if line.startswith("Version:")),
                   "")
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.suffix not in (".pyc", ".pyo"))
    if not version or not any(p.name == "sky_task.py" for p in files):
        raise ProviderError(f"no installed optjob at {package_dir} to build a wheel from",
                            hint="set OPTJOB_WHEEL=path/to/optjob.whl")
    out = dest or Path(tempfile.mkdtemp(prefix="optjob-wheel-"))
    out.mkdir(parents=True, exist_ok=True)
    info = f"optjob-{version}.dist-info"
    wheel = out / f"optjob-{version}-py3-none-any.whl"
    entries: list[tuple[str, bytes]] = [(f"optjob/{p.relative_to(package_dir).as_posix()}", p.read_bytes())
                                        for p in files]
    entries.append((f"{info}/METADATA", meta_text.encode()))
    if entry_points:
        entries.append((f"{info}/entry_points.txt", entry_points.encode()))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: optjob\nRoot-Is-Purelib: true\n"
                                     b"Tag: py3-none-any\n"))
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [*entries, (f"{info}/RECORD", record.encode())]:
            zf.writestr(name, data)
    return wheel


def preview_yaml(spec: JobSpec, *, job_file: str | Path, wheel: str | Path, inputs: Mapping[str, str] | None = None,
                 offer: str | None = None) -> str:
    """The task YAML apply would launch (attempt 1), for ``optjob plan --sky-task``: secrets null (SkyPilot
    fills each from the environment with ``--secret NAME``), the deadline left to launch time."""
    config = task_config(spec, attempt=1, env={}, job_file=job_file, wheel=wheel, inputs=inputs)
    launch = "sky jobs launch" if uses_managed_jobs(spec) else "sky launch"
    flags = "".join(f" --secret {name}" for name in spec.secrets)
    head = [f"# The SkyPilot task `optjob apply` launches for {spec.name} (attempt 1)"
            + (f"; the plan chose {offer}" if offer else "") + ".",
            f"# By hand: {launch} task.yaml{flags}" + (" (SkyPilot reads each secret from your environment)"
                                                        if spec.secrets else ""),
            f"# {job_file} is written by apply; the optjob wheel is built at launch (or OPTJOB_WHEEL)."]
    return "\n".join(head) + "\n" + dump_yaml(config)
