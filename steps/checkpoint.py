"""Resumable training checkpoints, written so a crash never leaves a half one in use.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` of ``torch.save`` files plus
``manifest.json`` (each file's sha256). It is written into a temporary folder and
renamed into place; on resume the newest checkpoint whose manifest checks out wins,
so a truncated or corrupted newest one falls back to the one before."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from optjob.specs.errors import StepError

from . import layout, records

MANIFEST = records.MANIFEST
KEEP = 2
#: Called as ``hook(folder, step)`` once a checkpoint is in place (``steps.sync`` uploads it).
on_checkpoint: list[Callable[[Path, int], None]] = []
#: Called as ``hook(path)`` when a step's resumable state file changed (hpo: its study after each
#: trial); ``steps.sync`` uploads it, so a search resumes on a fresh node with its trials.
on_state: list[Callable[[Path], None]] = []
_NAME = re.compile(r"^step-(\d{6,})$")


def state_changed(path: Path) -> None:
    """Tell the ``on_state`` hooks that ``path`` changed."""
    for hook in list(on_state):
        hook(path)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(root: Path, step: int, parts: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``parts`` (name -> object for ``torch.save``) and ``meta`` (JSON) as the
    checkpoint for ``step``; keep the newest ``KEEP`` checkpoints. Returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    final = root / checkpoint_name(step)
    try:
        digests: dict[str, str] = {}
        for name, obj in parts.items():
            file = tmp / f"{name}.pt"
            with open(file, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            digests[file.name] = _sha256(file)
        meta_file = tmp / "meta.json"
        meta_file.write_text(json.dumps({"step": step, **meta}, default=str))
        digests[meta_file.name] = _sha256(meta_file)
        manifest = {"step": step, "files": digests}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch reports a failed write (disk full, file-size limit) as an opaque RuntimeError from its
        # zip writer ("enforce fail at inline_container.cc"): say what failed and what is kept.
        kept = next((p.name for p in list_checkpoints(root) if p != final), None)
        raise StepError(
            f"could not write checkpoint {final.name} in {root}: {exc} (is the disk full, or a file-size "
            f"limit reached?); " + (f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint")
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root)
    for hook in list(on_checkpoint):
        hook(final, step)
    return final


def _prune(root: Path) -> None:
    for old in list_checkpoints(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp-*"):  # left by a process killed mid-write
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first (valid or not)."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def verify(folder: Path) -> bool:
    """True if the manifest is a valid record for this folder, every file it lists has its recorded
    sha256, and meta.json is a valid record of the same step (``records.checkpoint_problem``)."""
    return records.checkpoint_problem(folder) is None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for folder in list_checkpoints(root):
        problem = records.checkpoint_problem(folder)
        if problem is None:
            return folder
        print(
            f"checkpoint {folder} is incomplete or corrupt ({problem}): skipping it",
            file=sys.stderr,
            flush=True,
        )
    return None


def load_checkpoint(
    folder: Path, map_location: Any = "cpu", skip: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(parts, meta)`` of a checkpoint written by ``save_checkpoint`` (``meta`` as written:
    the keys its writer put there), less the parts named in ``skip`` (a sharded run's ranks other
    than 0 leave the weights and optimizer state to rank 0, which sends each its shard)."""
    try:
        meta = records.read(records.CheckpointMeta, folder / records.META).model_dump(exclude_unset=True)
    except records.InvalidRecord as exc:  # latest_checkpoint skips these: only a folder changed since
        raise StepError(f"checkpoint {folder} cannot be resumed: {exc}") from None
    parts = {}
    for file in sorted(folder.glob("*.pt")):
        if file.stem in skip:
            continue
        # Our own files: RNG states hold numpy/python objects that weights_only refuses.
        parts[file.stem] = torch.load(file, map_location=map_location, weights_only=False)
    return parts, meta


_sha256 = layout.sha256_file
