"""Keep a job folder and its artifact storage in step, so an attempt on a fresh node resumes.

When ``OPTJOB_STORAGE`` (``s3://``, ``gs://``, ``az://bucket/prefix``, or a folder the node shares)
is set on the node, the runner ``pull``s before it starts — every finished step (``done.json`` + its model), the newest
complete checkpoint of the first unfinished step, ``results.json`` — and pushes as it
goes: each checkpoint once it is in place (``checkpoint.on_checkpoint``), each finished
step, and ``results.json``. The storage mirrors the job folder::

    PREFIX/results.json
    PREFIX/steps/NN-KIND/done.json                  written after the model: marks the step done
    PREFIX/steps/NN-KIND/model/...                  complete when its .optjob-manifest.json exists
    PREFIX/steps/NN-KIND/checkpoints/step-NNNNNN/   idem; the newest KEEP are kept
    PREFIX/steps/NN-KIND/study.db                   hpo: the study, after every trial

A push that fails mid-run is reported on stderr and tried again at the next one (uploads
skip files already there); only the final push at the end of the job must succeed. Only
rank 0 pushes. ``optjob pull NAME`` uses ``pull`` too. Stdlib only at import: the storage
package (and its backend's SDK) is imported when a storage is opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .layout import COMPARE_KIND, RESULTS_FILE, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from optjob.steps.storage import Storage

ENV = "OPTJOB_STORAGE"
ENDPOINT_ENV = "OPTJOB_STORAGE_ENDPOINT"
#: A step's resumable state besides checkpoints (hpo's study), mirrored whole as ``steps/NN-KIND/NAME``.
STATE_FILES = ("study.db",)
KEEP = 2  # checkpoints kept in storage per step, as on disk (steps.checkpoint.KEEP)
_CKPT = re.compile(r"^step-(\d{6,})$")
_STEP = re.compile(r"^\d{2,}-[a-z_]+$")


def _say(message: str) -> None:
    print(f"[optjob] storage: {message}", file=sys.stderr, flush=True)


def _rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _valid_checkpoint(folder: Path) -> bool:
    """The checkpoint's own manifest (``steps.checkpoint``) is a valid record listing files that all
    check out, and its meta.json is one too (``records.checkpoint_problem``)."""
    from .records import checkpoint_problem

    return checkpoint_problem(folder) is None


def _done_problem(data: bytes, name: str, where: str) -> str | None:
    """Why ``data`` is not the done.json of the step folder ``name`` (``NN-KIND``, or
    ``NN-compare/VARIANT/MM-KIND`` for step MM of a compare variant), or None."""
    from .records import DoneRecord, InvalidRecord, parse

    try:
        done = parse(DoneRecord, data, where)
    except InvalidRecord as exc:
        return str(exc)
    parts = name.split("/")
    index, _, kind = parts[-1].partition("-")
    if len(parts) == 3:  # a variant's step: the record names its compare step, variant and place in it
        extra = done.model_extra or {}
        at = int(parts[0].partition("-")[0])
        if (done.index, done.kind, extra.get("variant"), extra.get("variant_step")) != (at, kind, parts[1], int(index)):
            return f"{where}: it records another step than variant {parts[1]} step {int(index)}"
        return None
    if (done.index, done.kind) != (int(index), kind):
        return f"{where}: it records steps[{done.index}] ({done.kind}), not {name}"
    return None


def _local_done(path: Path, name: str) -> bool:
    """``path`` holds a valid done.json of step folder ``name``."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return _done_problem(data, name, str(path)) is None


def _variant_steps(keys: list[str], compare: str) -> dict[str, list[str]]:
    """{variant: its step folders in order} under ``steps/NN-compare/`` in ``keys``."""
    out: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 5 and parts[1] == compare and _STEP.match(parts[3]) and not parts[2].startswith("_"):
            out.setdefault(parts[2], set()).add(parts[3])
    return {v: sorted(names, key=lambda n: int(n.split("-", 1)[0])) for v, names in sorted(out.items())}


def _results_problem(data: bytes, url: str) -> str | None:
    from .records import InvalidRecord, ResultsFile, parse

    try:
        parse(ResultsFile, data, f"{url}/{RESULTS_FILE}")
    except InvalidRecord as exc:
        return str(exc)
    return None


def _ckpt_step(name: str) -> int:
    m = _CKPT.match(name)
    return int(m.group(1)) if m else -1


def rebase_output(output: Any, job_dir: Path) -> Any:
    """A ``done.json`` output path written on another node -> the same file in ``job_dir``."""
    if not isinstance(output, str):
        return output
    parts = PurePosixPath(output).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "steps" and _STEP.match(parts[i + 1]):
            return str(job_dir.joinpath(*parts[i:]))
    return output


class Sync:
    """A job folder and its storage (``steps.storage.Storage``)."""

    def __init__(self, storage: Storage, job_dir: Path) -> None:
        self.storage, self.job_dir = storage, Path(job_dir)

    # -- pull -------------------------------------------------------------------------------------
    def pull(self, *, overwrite_results: bool = False) -> dict[str, Any]:
        """Fetch what the job folder lacks; returns what came (for a log line and tests)."""
        got: dict[str, Any] = {"steps": [], "checkpoints": [], "state": [], "results": False}
        with self._lock():
            keys = self.storage.list_keys("steps")
            names = {k.split("/")[1] for k in keys if k.count("/") >= 2 and _STEP.match(k.split("/")[1])}
            for name in sorted(names, key=lambda n: int(n.split("-", 1)[0])):
                if name.endswith(f"-{COMPARE_KIND}"):  # the last step: each variant resumes on its own
                    self._pull_variants(name, keys, got)
                    break
                if _local_done(self.job_dir / "steps" / name / "done.json", name):
                    continue  # this folder has it already (the same node, relaunched)
                if self._pull_step(name, keys):
                    got["steps"].append(name)
                    continue
                if (ckpt := self._pull_checkpoint(name)) is not None:  # the step to resume
                    got["checkpoints"].append(f"{name}/{ckpt}")
                got["state"] = self._pull_state(name, keys)
                break
            results = self.job_dir / RESULTS_FILE
            if overwrite_results or not results.exists():
                data = self.storage.get_bytes(RESULTS_FILE)
                if data is not None and (problem := _results_problem(data, self.storage.url)) is not None:
                    _say(f"{problem}: not pulled; the job writes it afresh")
                elif data is not None:
                    results.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(results, data)
                    got["results"] = True
        return got

    def _pull_variants(self, compare: str, keys: list[str], got: dict[str, Any]) -> None:
        """A compare step's variants, each like a pipeline: its finished steps, then the newest
        checkpoint of its first unfinished one."""
        for variant, folders in _variant_steps(keys, compare).items():
            for folder in folders:
                name = f"{compare}/{variant}/{folder}"
                if _local_done(self.job_dir / "steps" / name / "done.json", name):
                    continue
                if self._pull_step(name, keys):
                    got["steps"].append(name)
                    continue
                if (ckpt := self._pull_checkpoint(name)) is not None:
                    got["checkpoints"].append(f"{name}/{ckpt}")
                break

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One pull at a time per job folder (several ranks of one node start together)."""
        self.job_dir.mkdir(parents=True, exist_ok=True)
        with open(self.job_dir / ".sync.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _pull_step(self, name: str, keys: list[str]) -> bool:
        """A finished step: its model (if it made one), then its done.json. False if not finished."""
        from optjob.steps.storage import MANIFEST

        local = self.job_dir / "steps" / name
        data = self.storage.get_bytes(f"steps/{name}/done.json")
        if data is None:
            return False
        problem = _done_problem(data, name, f"{self.storage.url}/steps/{name}/done.json")
        if problem is not None:
            _say(f"{problem}: the step runs again")
            return False
        done = json.loads(data)
        done["output"] = rebase_output(done.get("output"), self.job_dir)
        if f"steps/{name}/model/{MANIFEST}" in keys:
            self._fetch(f"steps/{name}/model", local / "model")
        elif done["output"] == str(local / "model"):
            _say(f"steps/{name} has done.json but no complete model: the step runs again")
            return False
        write_json_atomic(local / "done.json", done)
        return True

    def _pull_checkpoint(self, name: str) -> str | None:
        """The newest complete checkpoint in storage, when it is newer than any valid one here."""
        prefix = f"steps/{name}/checkpoints"
        best = self.storage.latest_checkpoint(prefix)
        if best is None:
            return None
        root = self.job_dir / "steps" / name / "checkpoints"
        here = [p for p in root.iterdir() if _ckpt_step(p.name) >= 0] if root.is_dir() else []
        if any(_ckpt_step(p.name) >= _ckpt_step(best) and _valid_checkpoint(p) for p in here):
            return None
        self._fetch(f"{prefix}/{best}", root / best)
        return best

    def _pull_state(self, name: str, keys: list[str]) -> list[str]:
        """The step's state files (hpo's study) this folder lacks: a step that has one here is
        further along than, or as far as, the copy in storage."""
        got = []
        for file in STATE_FILES:
            local = self.job_dir / "steps" / name / file
            key = f"steps/{name}/{file}"
            if key in keys and not local.exists() and (data := self.storage.get_bytes(key)) is not None:
                write_bytes_atomic(local, data)
                got.append(f"{name}/{file}")
        return got

    def _fetch(self, prefix: str, dest: Path) -> None:
        """Download a complete folder; a new one appears whole (fetched aside, then renamed)."""
        if dest.is_dir():
            self.storage.sync_down(prefix, dest)  # verifies every file, fetches what differs
            return
        tmp = dest.parent / f".tmp-pull-{dest.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.storage.sync_down(prefix, tmp)
        os.replace(tmp, dest)

    # -- push -------------------------------------------------------------------------------------
    def push_checkpoint(self, folder: Path, step: int) -> None:
        """``checkpoint.on_checkpoint`` hook: upload the checkpoint, drop older ones from storage."""
        from optjob.specs.errors import ProviderError

        if not _rank0():
            return
        try:
            rel = Path(folder).resolve().relative_to(self.job_dir.resolve()).as_posix()
        except ValueError:
            return  # not this job's (a test's scratch folder)
        try:
            self.storage.sync_up(Path(folder), rel, step=step)
            self._prune(rel.rsplit("/", 1)[0], Path(folder).parent)
        except ProviderError as exc:
            _say(f"could not upload {rel} ({exc}); the next checkpoint tries again")

    def _prune(self, prefix: str, local_root: Path) -> None:
        keep = {p.name for p in local_root.iterdir() if _ckpt_step(p.name) >= 0}
        complete = self.storage.checkpoints(prefix)
        newest = sorted(complete, key=_ckpt_step)[-KEEP:]
        for name in complete:
            if name not in keep and name not in newest:
                from optjob.steps.storage import MANIFEST

                self.storage.delete(f"{prefix}/{name}/{MANIFEST}")  # incomplete first, then gone
                for key in self.storage.list_keys(f"{prefix}/{name}"):
                    self.storage.delete(key)

    def push_state(self, path: Path) -> None:
        """``checkpoint.on_state`` hook: upload a consistent copy of a step's state file (SQLite's
        online backup, so a write in progress cannot tear it). Errors wait for the next trial."""
        from optjob.specs.errors import ProviderError

        if not _rank0() or path.name not in STATE_FILES:
            return
        try:
            rel = Path(path).resolve().relative_to(self.job_dir.resolve()).as_posix()
        except ValueError:
            return
        snapshot = path.with_name(f".{path.name}.push")
        try:
            src, dst = sqlite3.connect(path), sqlite3.connect(snapshot)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
            self.storage.put_bytes(rel, snapshot.read_bytes())
        except (ProviderError, sqlite3.Error, OSError) as exc:
            _say(f"could not upload {rel} ({exc}); the next trial tries again")
        finally:
            snapshot.unlink(missing_ok=True)

    def push_steps(self, *, final: bool = False) -> None:
        """Upload every finished step storage lacks (model, then done.json), then results.json.
        Errors are reported and left for the next push, except at the end (``final``)."""
        from optjob.specs.errors import ProviderError

        if not _rank0():
            return
        try:
            steps = self.job_dir / "steps"
            finished = sorted(steps.glob("*/done.json")) + sorted(steps.glob(f"*-{COMPARE_KIND}/*/*/done.json"))
            for done in finished:
                rel = done.parent.relative_to(self.job_dir).as_posix()  # steps/NN-KIND, or a variant's step
                key = f"{rel}/done.json"
                data = done.read_bytes()
                if self.storage.get_bytes(key) == data:
                    continue
                model = done.parent / "model"
                if model.is_dir():
                    self.storage.sync_up(model, f"{rel}/model")
                self.storage.put_bytes(key, data)
            results = self.job_dir / RESULTS_FILE
            if results.is_file():
                self.storage.put_bytes(RESULTS_FILE, results.read_bytes())
        except ProviderError as exc:
            if final:
                raise
            _say(f"could not upload the finished steps ({exc}); tried again after the next step")

    # -- as the runner uses it --------------------------------------------------------------------
    def start(self) -> None:
        """Pull, then push every checkpoint written from now on."""
        from . import checkpoint

        got = self.pull()
        if got["steps"] or got["checkpoints"] or got["state"]:
            _say(f"pulled from {self.storage.url}: finished steps {got['steps'] or 'none'}, "
                 f"checkpoints {got['checkpoints'] or 'none'}, state {got['state'] or 'none'}")
        checkpoint.on_checkpoint.append(self.push_checkpoint)
        checkpoint.on_state.append(self.push_state)

    def close(self) -> None:
        from . import checkpoint

        with contextlib.suppress(ValueError):
            checkpoint.on_checkpoint.remove(self.push_checkpoint)
        with contextlib.suppress(ValueError):
            checkpoint.on_state.remove(self.push_state)


def from_env(job_dir: Path) -> Sync | None:
    """The sync the node's ``OPTJOB_STORAGE`` asks for, or None: unset, or a folder that does not exist
    here (a folder named on the manager's machine means nothing on a node, unless a shared filesystem
    mounts it at the same path). ``OPTJOB_STORAGE_ENDPOINT``: the storage service's endpoint (R2,
    MinIO, an Azure account, an emulator)."""
    url = os.environ.get(ENV, "").strip()
    if not url:
        return None
    from optjob.steps.storage import open_storage, scheme_of

    if scheme_of(url) is None:
        if "://" in url or not Path(url).is_absolute() or not Path(url).is_dir():
            _say(f"{ENV}={url} is not a bucket URL (s3://, gs://, az://) nor a folder on this node: "
                 "checkpoints stay on this node")
            return None
        return Sync(open_storage(url), job_dir)
    endpoint = os.environ.get(ENDPOINT_ENV, "").strip() or None
    return Sync(open_storage(url, endpoint_url=endpoint), job_dir)
