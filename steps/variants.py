"""A ``compare`` step's variants on the node: each a short pipeline from the same parent model.

The runner (``steps.runner``) runs the steps before ``compare`` as usual, then hands the parent's
folder to ``run_variants``. Every variant loads the parent afresh from disk (no variant sees another's
changes), runs its steps in ``steps/NN-compare/NAME/MM-KIND/`` and records each as a step: ``done.json``
with the compare step's ``index`` and its ``variant`` and ``variant_step``. A variant's steps carry
fingerprints of the steps before compare and the variant's own up to them, so a re-apply reuses every
unchanged variant and reruns a changed one alone (from its first changed step); a stopped job resumes
at the variant and step where it stopped (a training step from its checkpoint)."""

from __future__ import annotations

import functools
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from optjob.specs import EvaluateStep, JobSpec
from torch import nn

from . import dist, layout, records
from .context import StepContext, StepOutcome, StopFlag, finite
from .evaluate import evaluate_model
from .events import Emitter
from .fingerprint import fingerprint
from .modeling import load_model, save_model
from .phases import PhaseLog
from .sync import Sync

DONE_FILE = layout.DONE_FILE
MARK_FILE = "fingerprint"


@dataclass
class VariantContext(StepContext):
    """A variant step's context: ``index`` is its place in ``spec`` (the variant's spec, see
    ``JobSpec.variant_spec``); its folder and events are the variant's."""

    folder: Path = Path()
    variant: str = ""
    variant_step: int = 0
    compare_index: int = 0

    def step_dir(self) -> Path:
        return self.folder

    def emit(self, event: str, /, **fields: Any) -> dict[str, Any]:
        return super().emit(event, **{"index": self.compare_index, "variant": self.variant,
                                      "variant_step": self.variant_step, **fields})


class Host(Protocol):
    """What ``run_variants`` needs of the runner's ``Job``."""

    job_dir: Path
    spec: JobSpec
    attempt: int
    stop: StopFlag
    emitter: Emitter
    device: Any
    tokenizer: Any
    corpus: Any
    auto_eval: EvaluateStep
    sync: Sync | None
    index: int | None
    phases: PhaseLog
    job: layout.JobFile

    def _context(self, index: int, model_dir: Path | None) -> StepContext: ...

    def _record(self, results: dict[str, Any], done: dict[str, Any], *, skipped: bool) -> None: ...


def variant_fingerprints(spec: JobSpec, dry_run: bool) -> dict[str, list[str]]:
    """{variant: one hash per step}: of the model, data, the steps before compare and the variant's
    own up to that step (as ``runner.fingerprints`` hashes a step), never of the other variants."""
    out = {}
    start = len(spec.pipeline)
    for name in spec.variants:
        d = spec.variant_spec(name).model_dump(mode="json")
        out[name] = [fingerprint(d, i, dry_run) for i in range(start, len(d["steps"]))]
    return out


def forget_changed(job_dir: Path, spec: JobSpec, prints: dict[str, list[str]]) -> None:
    """As ``Job._forget_changed`` for each variant: from its first step whose recorded fingerprint
    differs, its folders are removed (that variant alone); then every step's mark is written."""
    at = len(spec.pipeline)
    for name, steps in spec.variants.items():
        for j, step in enumerate(steps):
            folder = layout.variant_step_dir(job_dir, at, name, j, step.kind)
            try:
                recorded = records.read(records.DoneRecord, folder / DONE_FILE).fingerprint
            except (OSError, records.InvalidRecord):
                mark = folder / MARK_FILE
                recorded = mark.read_text().strip() if mark.exists() else None
            if recorded is not None and recorded != prints[name][j]:
                print(f"spec changed at compare variant {name} step {j} ({step.kind}): starting it and the "
                      "variant's steps after it over", file=sys.stderr, flush=True)
                for later in sorted(layout.variant_dir(job_dir, at, name).glob("[0-9]*-*")):
                    if int(later.name.split("-", 1)[0]) >= j:
                        shutil.rmtree(later, ignore_errors=True)
                break
        for j, step in enumerate(steps):
            folder = layout.variant_step_dir(job_dir, at, name, j, step.kind)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MARK_FILE).write_text(prints[name][j] + "\n")


def done_prefix(job_dir: Path, spec: JobSpec, name: str) -> list[dict[str, Any]]:
    """done.json of the variant's leading finished steps (as ``Job._done_prefix``)."""
    at = len(spec.pipeline)
    out: list[dict[str, Any]] = []
    for j, step in enumerate(spec.variants[name]):

        def mismatch(done: records.DoneRecord, j: int = j, kind: str = step.kind) -> str | None:
            extra = done.model_extra or {}
            if (done.index, done.kind, extra.get("variant"), extra.get("variant_step")) == (at, kind, name, j):
                return None
            return f"it records another step than variant {name} step {j}"

        path = layout.variant_step_dir(job_dir, at, name, j, step.kind) / DONE_FILE
        done = records.finished_step(path, mismatch, f"variant {name} step {j} ({step.kind})",
                                     announce=dist.is_main())
        if done is None:
            break
        out.append(done)
    return out


def run_variants(host: Host, results: dict[str, Any], parent_dir: Path | None, parent: Callable[[], nn.Module],
                 prints: dict[str, list[str]], step_module: Callable[[str], ModuleType], *,
                 measure: bool = True) -> None:
    """Run every variant of ``host.spec``'s compare step from the parent model (``parent_dir``, or
    ``parent()`` saved to ``steps/NN-compare/_parent`` where the parent is on no disk). ``step_module``:
    the runner's registry of step kinds; ``measure``: evaluate every step's output (as the runner does)."""
    spec, at = host.spec, len(host.spec.pipeline)
    if parent_dir is None:
        folder = layout.step_dir(host.job_dir, at, layout.COMPARE_KIND) / layout.PARENT_DIR
        if dist.is_main():
            save_model(parent(), folder, host.tokenizer)
        dist.barrier()
        parent_dir = folder
    for name, steps in spec.variants.items():
        vspec = spec.variant_spec(name)
        dones = dist.broadcast_object(done_prefix(host.job_dir, spec, name))
        start_dir: Path = Path(dones[-1]["output"]) if dones and dones[-1].get("output") else parent_dir
        # [the variant's model in memory (None: load it from the folder), that folder]
        state: list[Any] = [None, start_dir]
        for j, step in enumerate(steps):
            host.index = at
            host.emitter.emit("step_started", index=at, kind=step.kind, total=at + 1, variant=name,
                              variant_step=j, variant_steps=len(steps))
            if j < len(dones):
                host._record(results, dones[j], skipped=True)
                continue
            dist.check_stop(host.stop)
            t = time.perf_counter()
            base = host._context(at + j, state[1])
            ctx = VariantContext(**{**base.__dict__, "spec": vspec},
                                 folder=layout.variant_step_dir(host.job_dir, at, name, j, step.kind),
                                 variant=name, variant_step=j, compare_index=at)
            everywhere = dist.runs_everywhere(step.kind)
            if everywhere:
                dist.ensure_folder(state[1])

            before = state[1]
            execute = functools.partial(_execute, host, ctx, step, state, prints[name][j], t, step_module, measure)
            record = dist.broadcast_object(execute()) if everywhere else dist.on_main(execute)
            state[1] = Path(record["output"])
            if not dist.is_main() and not everywhere and state[1] != before:
                state[0] = None  # changed on rank 0: loaded again where needed
            host._record(results, record, skipped=False)
            host.phases.leave()
            if host.sync is not None:
                with host.phases.span("upload", index=at, kind=step.kind, variant=name):
                    host.sync.push_steps()
    host.index = None


def _execute(host: Host, ctx: VariantContext, step: Any, state: list[Any], fingerprint: str, t: float,
             step_module: Callable[[str], ModuleType], measure: bool) -> dict[str, Any]:
    """Run one variant step; rank 0 saves its model and done.json. Its record."""
    # the parent afresh from disk (or the variant's model so far): no variant sees another's
    host.phases.enter("step", index=ctx.compare_index, kind=step.kind, variant=ctx.variant)
    model = state[0] if state[0] is not None else load_model(state[1], host.device)
    outcome: StepOutcome = step_module(step.kind).run(ctx, step, model)
    state[0], out_dir = outcome.model, state[1]
    if not isinstance(step, EvaluateStep) and dist.is_main():
        out_dir = save_model(outcome.model, ctx.step_dir() / "model", host.tokenizer)
        if host.job.dry_run:  # the output loads as a user would load it
            from .dry_run_checks import reload

            reload(host.emitter, ctx.compare_index, step.kind, out_dir, variant=ctx.variant,
                   variant_step=ctx.variant_step)
    step_s = time.perf_counter() - t
    metrics = dict(outcome.metrics)
    if measure and step.kind != "evaluate" and dist.is_main():
        host.stop.check()
        host.phases.enter("step_eval", index=ctx.compare_index, kind=step.kind, variant=ctx.variant)
        metrics = {**evaluate_model(ctx, outcome.model, host.auto_eval, out_dir), **metrics}
        metrics["eval_s"] = round(time.perf_counter() - t - step_s, 3)
    metrics["step_s"] = round(step_s, 3)
    record = {"index": ctx.compare_index, "kind": step.kind, "variant": ctx.variant, "variant_step": ctx.variant_step,
              "output": str(out_dir), "metrics": metrics, "wall_s": round(time.perf_counter() - t, 3),
              "extra": outcome.extra, "attempt": host.attempt, "fingerprint": fingerprint}
    if dist.is_main():
        layout.write_json_atomic(ctx.step_dir() / DONE_FILE, finite(record))
    return record
