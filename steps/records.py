"""The files the workload writes and later reads back, as strict models: ``done.json``,
``results.json``, and a checkpoint's ``manifest.json`` and ``meta.json``.

Whatever is on disk (or came back from artifact storage) may be torn, hand-edited, written by
another version or not ours at all: valid JSON is not yet a record (``[]``, ``{"index": 0}``).
Every read goes through ``parse``, which returns the record or raises ``InvalidRecord`` with one
line saying why; the caller treats an invalid file as absent (the step runs again, the checkpoint
is skipped) and says so on stderr with ``warn``, never crashes on it.

Strict: JSON types are not coerced (``"3"`` is not an int, ``true`` is not a number); a number
may stand for a float. Keys this version does not know are kept, so a record written by a newer
optjob is still read. Stdlib and pydantic only (no torch): ``steps.sync`` uses it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .layout import CHECKPOINT_MANIFEST, sha256_file

#: A checkpoint's manifest (``steps.checkpoint``).
MANIFEST = CHECKPOINT_MANIFEST
META = "meta.json"
_CKPT_NAME = re.compile(r"^step-(\d{6,})$")


class InvalidRecord(ValueError):
    """A file that is not the record it should be; ``str()`` is one line."""


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class StepEntry(_Record):
    """One finished step, as ``results.json`` lists it."""

    index: int = Field(ge=0)
    kind: str = Field(min_length=1)
    output: str | None
    metrics: dict[str, Any]
    wall_s: float | None
    extra: dict[str, Any]


class DoneRecord(StepEntry):
    """``steps/NN-KIND/done.json``: written atomically once the step finished."""

    attempt: int = Field(ge=1)
    #: Absent in folders written by an optjob from before fingerprints.
    fingerprint: str | None = None

    @model_validator(mode="after")
    def _hpo_overrides(self) -> DoneRecord:
        # The runner applies an hpo step's overrides to the spec of the steps after it.
        if self.kind == "hpo":
            try:
                _HpoExtra.model_validate(self.extra)
            except ValidationError as exc:
                raise ValueError(f"extra.{_where_what(exc)}") from None
        return self


class _HpoExtra(_Record):
    overrides: dict[str, dict[str, Any]]


class ResultsFile(_Record):
    """``results.json``: every step's metrics, the baseline and final evaluations."""

    name: str
    steps: list[StepEntry] = Field(default_factory=list)
    baseline: dict[str, Any] | None = None
    final: dict[str, Any] | None = None


_FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")]
_Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class CheckpointManifest(_Record):
    """A checkpoint's ``manifest.json``: the step and each file's sha256 (meta.json among them).
    File names are plain names in the checkpoint's folder: a manifest cannot point outside it."""

    step: int = Field(ge=0)
    files: dict[_FileName, _Sha256]

    @model_validator(mode="after")
    def _has_meta(self) -> CheckpointManifest:
        if META not in self.files:
            raise ValueError(f"lists no {META}")
        return self


class CheckpointMeta(_Record):
    """A checkpoint's ``meta.json``: its step, plus what the writer keeps there (the training
    loop: its loss curve, evaluations and early-stopping state)."""

    step: int = Field(ge=0)
    losses: list[tuple[int, float]] | None = None
    evals: list[tuple[int, float]] | None = None
    best: float | None = None
    bad: int | None = Field(None, ge=0)
    max_steps: int | None = Field(None, ge=0)


R = TypeVar("R", bound=_Record)


def parse(model: type[R], data: bytes | str, what: str | Path) -> R:
    """``data`` (JSON) as a ``model``, or ``InvalidRecord`` naming ``what`` and the first problem."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidRecord(f"{what}: {_first_problem(exc, model)}") from None


def read(model: type[R], path: Path) -> R:
    """The record in ``path``; ``InvalidRecord`` if it is not one, ``OSError`` if it cannot be read
    (a missing file: FileNotFoundError)."""
    return parse(model, path.read_bytes(), path)


def _first_problem(exc: ValidationError, model: type[BaseModel]) -> str:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"not valid JSON ({errors[0].get('ctx', {}).get('error', errors[0]['msg'])})"
    return f"not a valid {model.__name__}: {_where_what(exc)}"


def _where_what(exc: ValidationError) -> str:
    """``loc: message`` of the first error, and how many more there are."""
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc).splitlines()[0]
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"])
    what = str(err["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{where}: {what}" if where else what) + more


def warn(message: str) -> None:
    """One line on stderr (the attempt's log): an invalid file is being ignored, and what happens instead."""
    print(f"[optjob] {message}", file=sys.stderr, flush=True)


def finished_step(path: Path, mismatch: Callable[[DoneRecord], str | None], label: str, *,
                  announce: bool) -> dict[str, Any] | None:
    """The done.json at ``path`` as a dict, when it is a valid record of its step and the model folder
    it names still exists; None when the step must run (again). ``mismatch``: why a valid record is
    not this step's (None: it is). An invalid one counts as absent: it is moved aside
    (``done.json.invalid``) so it is neither read nor uploaded again, and, where ``announce`` (one
    rank says so), a line says that ``label`` runs again."""
    try:
        done = read(DoneRecord, path)
        if (why := mismatch(done)) is not None:
            raise InvalidRecord(f"{path}: {why}")
    except FileNotFoundError:
        return None
    except (OSError, InvalidRecord) as exc:
        if announce:
            reason = str(exc) if isinstance(exc, InvalidRecord) else f"{path}: {exc.strerror or exc}"
            warn(f"{reason}; {label} runs again")
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + ".invalid"))
        return None
    if done.output and not Path(done.output).is_dir():
        return None  # its model is gone: run it again
    return done.model_dump(mode="json")


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be used, or None when it can: its manifest is a
    valid one for this folder's step, every file it lists has its recorded sha256, and its
    meta.json is a valid record of the same step."""
    try:
        manifest = read(CheckpointManifest, folder / MANIFEST)
        named = _CKPT_NAME.match(folder.name)
        if named and int(named.group(1)) != manifest.step:
            return f"{folder / MANIFEST}: step {manifest.step}, but the folder is {folder.name}"
        for name, digest in manifest.files.items():
            if sha256_file(folder / name) != digest:
                return f"{folder / name}: checksum does not match the manifest"
        meta = read(CheckpointMeta, folder / META)
        if meta.step != manifest.step:
            return f"{folder / META}: step {meta.step}, but the manifest says {manifest.step}"
    except InvalidRecord as exc:
        return str(exc)
    except OSError as exc:
        return f"{folder}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    return None
