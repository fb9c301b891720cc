"""Run checks one after another, each in its own try block and time limit, and record each as
``ok``, ``failed`` (with the error's last line) or ``skipped`` (with the reason: no CUDA, a missing
package); what the machine has (packages, GPUs) and what could not be imported."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STATUSES = ("ok", "failed", "skipped")
#: Importable name -> distribution name, reported in ``environment.packages``.
PACKAGES = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
    "torchao": "torchao", "bitsandbytes": "bitsandbytes", "pydantic": "pydantic", "yaml": "pyyaml",
    "tokenizers": "tokenizers", "safetensors": "safetensors", "numpy": "numpy",
}  # fmt: skip
#: optjob's packages and the folders of this checkout that hold them (pyproject's package-dir).
OPTJOB_DIRS = ("specs", "steps", "providers", "manager")


class Skip(Exception):
    """A check that cannot run here: status ``skipped``, ``str(exc)`` the reason."""


class CheckFailed(Exception):
    """A check that ran but whose result is wrong (a loss that does not decrease, a reload that differs)."""


#: What a check does: fills the record it is given (``figure``, ``unit``, ``goal``, ``met``, ``metrics``)
#: and returns, or raises (``Skip``, ``CheckFailed``, anything else); what it filled in is kept either way.
CheckFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    fn: CheckFn
    timeout_s: float = 180.0


def last_line(exc: BaseException) -> str:
    """The last line of the exception as a traceback ends (``Type: message``, or the message's last line)."""
    lines = [ln for ln in "".join(traceback.format_exception_only(type(exc), exc)).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _where(exc: BaseException) -> str | None:
    """``file:line`` of the innermost frame of the traceback inside this checkout, if any."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        with contextlib.suppress(ValueError):
            found = f"{path.resolve().relative_to(REPO)}:{frame.lineno}"
    return found


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the check when it runs past ``seconds`` (SIGALRM: main thread, Unix only)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the check ran past its {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def new_record(title: str) -> dict[str, Any]:
    return {"title": title, "status": None, "figure": None, "unit": None, "goal": None, "met": None,
            "error": None, "reason": None, "seconds": None, "metrics": {}}


def run_check(check: Check, cleanup: Callable[[], None] | None = None, *, timeout_scale: float = 1.0) -> dict[str, Any]:
    """Run one check; never raises (but KeyboardInterrupt). Its prints go to stderr: stdout is the JSON."""
    record = new_record(check.title)
    started = time.perf_counter()
    print(f"== {check.name}: {check.title}", file=sys.stderr, flush=True)
    try:
        with contextlib.redirect_stdout(sys.stderr), time_limit(check.timeout_s * timeout_scale):
            check.fn(record)
        record["status"] = "ok"
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # StopRequested is a BaseException; anything else a check raises
        traceback.print_exc(file=sys.stderr)
        record.update(status="failed", error=last_line(exc), where=_where(exc))
    finally:
        record["seconds"] = round(time.perf_counter() - started, 2)
        if cleanup is not None:
            try:
                cleanup()
            except Exception as exc:  # a broken device after a failure: recorded, the next check tries anyway
                record.setdefault("cleanup_error", last_line(exc))
        gc.collect()
    print(f"== {check.name}: {record['status']} {record['figure'] if record['figure'] is not None else ''} "
          f"{record['error'] or record['reason'] or ''}", file=sys.stderr, flush=True)
    return record


def failed_everywhere(checks: list[Check], error: str) -> dict[str, dict[str, Any]]:
    """Every check failed with ``error`` (what they all need could not be set up)."""
    out = {}
    for check in checks:
        record = new_record(check.title)
        record.update(status="failed", error=error)
        out[check.name] = record
    return out


def ensure_optjob() -> str:
    """Make ``import optjob.*`` work: the installed package, or (a bare checkout, as on the device
    machine) a folder ``optjob/`` of links to this checkout's package folders put on ``sys.path`` and
    ``PYTHONPATH`` (for subprocesses). Returns which."""
    try:
        found = importlib.util.find_spec("optjob.steps")
    except ModuleNotFoundError:
        found = None
    if found is not None:
        return "installed"
    root = Path(tempfile.mkdtemp(prefix="optjob-shim-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # links only: rmtree does not follow them
    package = root / "optjob"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in OPTJOB_DIRS:
        (package / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return f"not installed: imported from {REPO} through links in {package}"


def environment() -> dict[str, Any]:
    """Python, package versions, what could not be imported (and why), and the GPUs torch sees."""
    versions: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for module, dist in PACKAGES.items():
        try:
            with contextlib.redirect_stdout(sys.stderr):
                importlib.import_module(module)
        except BaseException as exc:  # an import can fail in any way (a missing CUDA library, a bad build)
            if isinstance(exc, KeyboardInterrupt):
                raise
            errors[dist] = last_line(exc)
            versions[dist] = None
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "?"
    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "cpus": os.cpu_count(), "packages": versions, "import_errors": errors}
    if "torch" in errors:
        return out
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    out.update(cuda_available=torch.cuda.is_available(), cuda_version=torch.version.cuda, gpus=gpus,
               bf16_supported=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    return out


def need_module(module: str) -> None:
    """``Skip`` with the ImportError's line when ``module`` cannot be imported."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            importlib.import_module(module)
    except Exception as exc:
        raise Skip(last_line(exc)) from None


def summary(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    counts = {s: sum(1 for r in checks.values() if r["status"] == s) for s in STATUSES}
    missed = sorted(name for name, r in checks.items() if r["met"] is False)
    return {**counts, "goals_missed": missed}
