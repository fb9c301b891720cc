"""Where things live inside a job folder: the contract between manager and workload.

::

    JOB_DIR/
      job.json                   what the workload runs (written by the manager; see JobFile)
      logs/attempt-N.log         everything the workload printed in attempt N (local provider)
      steps/NN-KIND/             one folder per step (NN = index, zero-padded)
        model/                   the step's output model (save_pretrained, or quantized
                                 state + recipe)
        checkpoints/             resumable checkpoints of a training-like step
        done.json                written atomically when the step finished: its metrics
        NN-compare/NAME/MM-KIND/ step MM of compare variant NAME, laid out as a step
      results.json               every step's metrics, written after each step
      report.md, report.html     written by the manager
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
RESULTS_FILE = "results.json"
#: A step is finished once this file is in its folder.
DONE_FILE = "done.json"
#: A checkpoint folder (``steps/NN-KIND/checkpoints/step-NNNNNN``) is complete once this is in it.
CHECKPOINT_MANIFEST = "manifest.json"


def step_dir(job_dir: Path, index: int, kind: str) -> Path:
    return job_dir / "steps" / f"{index:02d}-{kind}"


#: The folder of a ``compare`` step's variants: ``steps/NN-compare/NAME/MM-KIND/`` holds step MM of
#: variant NAME, as ``steps/NN-KIND/`` holds a step (model, checkpoints, done.json, fingerprint);
#: ``steps/NN-compare/_parent/`` the parent model when it exists on no disk yet (built from model.init).
COMPARE_KIND = "compare"
PARENT_DIR = "_parent"  # no variant name starts with _


def variant_dir(job_dir: Path, compare_index: int, name: str) -> Path:
    return step_dir(job_dir, compare_index, COMPARE_KIND) / name


def variant_step_dir(job_dir: Path, compare_index: int, name: str, index: int, kind: str) -> Path:
    return variant_dir(job_dir, compare_index, name) / f"{index:02d}-{kind}"


def _step_folders(steps: Path) -> list[tuple[str, Path]]:
    """(name shown, folder) of every step folder, a compare step's variant steps included."""
    out = []
    for folder in sorted(p for p in steps.iterdir() if p.is_dir()):
        if folder.name.endswith(f"-{COMPARE_KIND}"):
            out += [(f"{folder.name}/{v.name}/{s.name}", s) for v in sorted(folder.iterdir())
                    if v.is_dir() and v.name != PARENT_DIR for s in sorted(v.iterdir()) if s.is_dir()]
        else:
            out.append((folder.name, folder))
    return out


def kept_progress(job_dir: Path) -> str | None:
    """What a resumed run would keep, in words ("00-train done; checkpoint at step 40 of 01-prune"),
    or None when nothing was saved yet. Only complete files count."""
    steps = job_dir / "steps"
    if not steps.is_dir():
        return None
    folders = _step_folders(steps)
    done = [name for name, d in folders if (d / DONE_FILE).is_file()]
    parts = [f"{', '.join(done)} done"] if done else []
    for name, folder in folders:
        if name in done:
            continue
        saved = sorted(c.name for c in (folder / "checkpoints").glob("step-*") if (c / CHECKPOINT_MANIFEST).is_file())
        if saved:
            parts.append(f"checkpoint at step {int(saved[-1].split('-')[1])} of {name}")
    return "; ".join(parts) or None


def log_path(job_dir: Path, attempt: int) -> Path:
    return job_dir / "logs" / f"attempt-{attempt}.log"


@dataclass
class JobFile:
    """``job.json``: the resolved spec plus what the run needs to know about itself.

    Paths in ``spec`` (model.path, data.source, tokenizer) are absolute, resolved
    by the manager against the spec file's folder."""

    spec: dict[str, Any]
    dry_run: bool = False
    #: "auto" picks cuda > mps > cpu; "cpu" forces the CPU (apply --local on a GPU box
    #: still uses it).
    device: str = "auto"
    #: Folder for caches shared across jobs (corpus, tokenizer): OPTJOB_HOME/cache.
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, job_dir: Path) -> Path:
        return write_json_atomic(job_dir / JOB_FILE, asdict(self))

    @classmethod
    def read(cls, job_dir: Path) -> JobFile:
        data = json.loads((job_dir / JOB_FILE).read_text())
        return cls(**data)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoint manifests, storage checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` so a reader sees the old file or the new one, never half of one."""
    return _write_atomic(path, "wb", lambda f: f.write(data))


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON atomically, as ``write_bytes_atomic`` (serialized straight into the temporary file)."""
    return _write_atomic(path, "w", lambda f: json.dump(data, f, indent=2, default=str))


def _write_atomic(path: Path, mode: str, write: Callable[[Any], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
