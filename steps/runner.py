"""``python -m optjob.steps run JOB_DIR``: run a job's pipeline on this machine.

Reads ``job.json``, builds the data, tokenizer and starting model, evaluates a
baseline, runs each step (skipping finished ones, resuming a half-done training
step from its checkpoint), saves each step's model, and reports JSON-lines events.

Under torchrun (WORLD_SIZE > 1) every rank runs this: train and distill run on all
ranks with DDP, every other step and the automatic evaluations on rank 0 while the
others wait, and only rank 0 reports and writes (see ``dist``).

Exit codes: 0 done, 1 failed (after an ``error`` event), 2 bad job file,
4 stopped at the budget deadline, 143 stopped by a signal."""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from optjob.specs import EvaluateStep, JobSpec
from optjob.specs.errors import StepError
from torch import nn

from . import dist, layout, phases, records, variants, watchdog
from .context import StepContext, StepOutcome, StopFlag, StopRequested, finite
from .data import build_corpus, load_text
from .device import pick_device, set_threads
from .dry_run import DRY_RUN_CAPS, proxy_spec
from .evaluate import evaluate_model
from .events import Emitter
from .exit_codes import EXIT_BAD_JOB, EXIT_DEADLINE, EXIT_FAILED, EXIT_OK, EXIT_SIGNAL
from .fingerprint import fingerprint
from .modeling import initial_model, load_model, save_model
from .sync import Sync, from_env
from .tokenizer import load_tokenizer

__all__ = ["StepOutcome", "main", "preflight", "step_module"]

DONE_FILE = layout.DONE_FILE


def step_module(kind: str) -> ModuleType:
    """``optjob.steps.<kind>``, the module with the step's ``run(ctx, step, model)``."""
    name = f"{__package__}.{kind}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise StepError(f"step kind {kind!r} is not implemented on this node (no module {name})") from None
        raise StepError(f"step {kind!r} cannot run: its module needs {exc.name!r}, which is not installed") from None
    if not callable(getattr(module, "run", None)):
        raise StepError(f"module {name} has no run(ctx, step, model)")
    return module


def preflight(spec: JobSpec, device: torch.device) -> None:
    """Import every step's module and run its ``preflight(step, device)``, so a pipeline
    that cannot finish fails before its first step rather than in the middle."""
    for step in [*spec.pipeline, *(s for steps in spec.variants.values() for s in steps)]:
        check = getattr(step_module(step.kind), "preflight", None)
        if check is not None:
            check(step, device)


def fingerprints(spec: JobSpec, dry_run: bool) -> list[str]:
    """One hash per step of everything its output depends on: model, data and the steps up to it."""
    d = spec.model_dump(mode="json")
    return [fingerprint(d, i, dry_run) for i in range(len(d["steps"]))]


def cache_dir(job: layout.JobFile) -> Path:
    if job.cache_dir:
        return Path(job.cache_dir).expanduser()
    if os.environ.get("OPTJOB_CACHE"):
        return Path(os.environ["OPTJOB_CACHE"]).expanduser()
    home = os.environ.get("OPTJOB_HOME")
    return Path(home).expanduser() / "cache" if home else Path.home() / ".cache" / "optjob"


class Job:
    """One attempt at a job folder's pipeline."""

    def __init__(
        self,
        job_dir: Path,
        job: layout.JobFile,
        spec: JobSpec,
        attempt: int,
        stop: StopFlag,
        emitter: Emitter,
    ) -> None:
        self.job_dir, self.job, self.spec, self.attempt = job_dir, job, spec, attempt
        self.stop, self.emitter = stop, emitter
        self.index: int | None = None
        self.sync: Sync | None = None  # artifact storage (OPTJOB_STORAGE): pushed after each step
        self.device = torch.device("cpu")
        self.results_path = job_dir / layout.RESULTS_FILE
        self.phases = phases.PhaseLog(emitter)  # what the console shows as running now
        phases.install(self.phases)
        #: step index -> the automatic evaluation of its output, made in this attempt (the final
        #: evaluation of the last step's model is that one, not a second run of it).
        self.evaluated: dict[int, dict[str, Any]] = {}

    def run(self) -> None:
        try:
            self._run()
        finally:  # the next job in this process (a test's) gets its own log, not this one's stream
            if phases.active() is self.phases:
                phases.install(None)

    def _run(self) -> None:
        started = time.time()
        if self.phases.current != "starting":
            self.phases.enter("starting")
        self.device = dist.init(pick_device(self.job.device))
        set_threads()
        if self.job.dry_run:
            from .dry_run_checks import stand_in

            self.spec = proxy_spec(real := self.spec)
            stand_in(self.emitter, real, self.spec)
        spec = self.spec
        # The automatic baseline/final evaluation: defaults, dry-run caps, then
        # job.json extra["auto_evaluate"] (EvaluateStep fields) on top.
        auto = dict(DRY_RUN_CAPS["evaluate"]) if self.job.dry_run else {}
        auto.update(self.job.extra.get("auto_evaluate") or {})
        self.auto_eval = EvaluateStep.model_validate(auto)
        preflight(spec, self.device)
        self.phases.enter("data")
        cache = cache_dir(self.job)
        text = load_text(spec.data, cache)
        self.tokenizer = load_tokenizer(spec, text, cache)
        self.corpus = build_corpus(spec, self.tokenizer, cache, dry_run=self.job.dry_run, text=text)
        print(
            f"device {self.device}, {self.corpus}, vocab {len(self.tokenizer)}",
            file=sys.stderr,
            flush=True,
        )
        self.phases.leave()

        self.fingerprints = fingerprints(spec, self.job.dry_run)
        variant_prints = variants.variant_fingerprints(spec, self.job.dry_run)
        if dist.is_main():
            self._forget_changed()
            variants.forget_changed(self.job_dir, spec, variant_prints)
        dist.barrier()
        results = self._read_results()
        steps = spec.pipeline
        dones = dist.broadcast_object(self._done_prefix())  # rank 0's view
        initial_dir = Path(spec.model.path) if spec.model.path and not self.job.dry_run else None
        model_dir = Path(dones[-1]["output"]) if dones and dones[-1].get("output") else initial_dir
        model: nn.Module | None = None

        def current() -> nn.Module:
            nonlocal model
            if model is None:
                model = load_model(model_dir, self.device) if model_dir is not None else self._initial_model()
            return model

        if "baseline" not in results:

            def baseline() -> dict[str, Any]:
                self.stop.check()
                base = current() if not dones else self._initial_model()
                return evaluate_model(self._context(0, initial_dir), base, self.auto_eval, initial_dir)

            self.phases.enter("baseline")
            results["baseline"] = dist.on_main(baseline)
            self.phases.leave()
            self._write_results(results)

        def execute(i: int, step: Any, ctx: StepContext, t: float) -> dict[str, Any]:
            """Run step ``i``; rank 0 saves its model and done.json. Its record."""
            nonlocal model, model_dir
            self.phases.enter("step", index=i, kind=step.kind)
            outcome: StepOutcome = step_module(step.kind).run(ctx, step, current())
            model = outcome.model
            if not isinstance(step, EvaluateStep) and dist.is_main():
                model_dir = save_model(model, ctx.step_dir() / "model", self.tokenizer)
                if self.job.dry_run:  # the output loads as a user would load it
                    from .dry_run_checks import reload

                    reload(self.emitter, i, step.kind, model_dir)
            step_s = time.perf_counter() - t
            metrics = dict(outcome.metrics)
            measure = self.job.extra.get("evaluate_each_step", True)
            if measure and step.kind not in ("evaluate", "hpo") and dist.is_main():
                # Every step's output model is measured the same way, so the report compares them
                # side by side; the step's own figures (sparsity, sizes before/after) take precedence.
                self.stop.check()
                self.phases.enter("step_eval", index=i, kind=step.kind)
                self.evaluated[i] = evaluate_model(ctx, model, self.auto_eval, model_dir)
                metrics = {**self.evaluated[i], **metrics}
                metrics["eval_s"] = round(time.perf_counter() - t - step_s, 3)
            self.phases.leave()
            metrics["step_s"] = round(step_s, 3)
            # What the step cost in time: its own work and the evaluation of its output, both.
            wall_s = round(time.perf_counter() - t, 3)
            record = {
                "index": i,
                "kind": step.kind,
                "output": str(model_dir) if model_dir else None,
                "metrics": metrics,
                "wall_s": wall_s,
                "extra": outcome.extra,
                "attempt": self.attempt,
                "fingerprint": self.fingerprints[i],
            }
            if dist.is_main():
                layout.write_json_atomic(ctx.step_dir() / DONE_FILE, finite(record))
            return record

        for i in range(len(steps)):
            step = self.spec.pipeline[i]  # re-read: an hpo step rewrites the steps after it
            self.index = i
            self.emitter.emit("step_started", index=i, kind=step.kind, total=len(steps))
            if i < len(dones):
                self._record(results, dones[i], skipped=True)
                self._apply_hpo(i, step, dones[i].get("extra") or {})
                continue
            dist.check_stop(self.stop)
            t = time.perf_counter()
            ctx = self._context(i, model_dir)
            everywhere = dist.runs_everywhere(step.kind)
            if everywhere:
                dist.ensure_folder(model_dir)  # the model to start from, on every node
            before = str(model_dir) if model_dir else None
            run_step = functools.partial(execute, i, step, ctx, t)
            record = dist.broadcast_object(run_step()) if everywhere else dist.on_main(run_step)
            if not dist.is_main():  # rank 0's output; a model changed on rank 0 is loaded again
                model_dir = Path(record["output"]) if record["output"] else None
                if not everywhere and record["output"] != before:
                    model = None
            self._record(results, record, skipped=False)
            if self.sync is not None:
                with self.phases.span("upload", index=i, kind=step.kind):
                    self.sync.push_steps()  # rank 0 only; a failure here is retried at the next push
            self._apply_hpo(i, step, record["extra"] or {})
        self.index = None
        if spec.compare is not None:  # no one final model: each variant's steps are measured
            results.pop("final", None)
            variants.run_variants(self, results, model_dir, current, variant_prints, step_module,
                                  measure=self.job.extra.get("evaluate_each_step", True))
        elif isinstance(steps[-1], EvaluateStep):
            results["final"] = results["steps"][-1]["metrics"]
        elif (len(dones) < len(steps) and self.job.extra.get("evaluate_each_step", True)
              and steps[-1].kind != "hpo"):  # the last step's output was measured in this attempt: once is enough
            results["final"] = dist.on_main(lambda: self.evaluated[len(steps) - 1])
        elif len(dones) < len(steps) or "final" not in results:

            def final() -> dict[str, Any]:
                self.stop.check()
                return evaluate_model(self._context(len(steps) - 1, model_dir), current(), self.auto_eval, model_dir)

            self.phases.enter("final")
            results["final"] = dist.on_main(final)
            self.phases.leave()
        self._write_results(results)
        if self.sync is not None:
            with self.phases.span("upload"):
                self.sync.push_steps(final=True)  # the node may be gone next: this push must succeed
        self.emitter.emit("job_done", results=str(self.results_path), wall_s=round(time.time() - started, 3))

    def _context(self, index: int, model_dir: Path | None) -> StepContext:
        return StepContext(
            spec=self.spec,
            job_dir=self.job_dir,
            index=index,
            emitter=self.emitter,
            device=self.device,
            dry_run=self.job.dry_run,
            corpus=self.corpus,
            tokenizer=self.tokenizer,
            stop=self.stop,
            cache_dir=cache_dir(self.job),
            model_dir=model_dir,
            attempt=self.attempt,
        )

    def _apply_hpo(self, index: int, step: Any, extra: dict[str, Any]) -> None:
        """An hpo step's best parameters become the options of the step it tuned."""
        if step.kind == "hpo" and extra.get("overrides"):
            from .hpo import apply_overrides

            self.spec = apply_overrides(self.spec, index, extra["overrides"])

    def _forget_changed(self) -> None:
        """A step's folder belongs to one version of the spec up to that step. When a re-apply
        changed it (other options, another model or data), that step and every later one start
        over instead of reusing stale checkpoints or outputs. Only a positive mismatch counts:
        folders pulled from storage by an older optjob carry no fingerprint and are kept."""
        for i, step in enumerate(self.spec.pipeline):
            folder = layout.step_dir(self.job_dir, i, step.kind)
            try:
                recorded = records.read(records.DoneRecord, folder / DONE_FILE).fingerprint
            except (OSError, records.InvalidRecord):  # _done_prefix says why, and reruns the step
                mark = folder / "fingerprint"
                recorded = mark.read_text().strip() if mark.exists() else None
            if recorded is not None and recorded != self.fingerprints[i]:
                print(f"spec changed at steps[{i}] ({step.kind}): starting it and the steps after it over",
                      file=sys.stderr, flush=True)
                for later in sorted((self.job_dir / "steps").glob("[0-9]*-*")):
                    if int(later.name.split("-", 1)[0]) >= i:
                        shutil.rmtree(later, ignore_errors=True)
                if i == 0:
                    self.results_path.unlink(missing_ok=True)
                break
        for i, step in enumerate(self.spec.pipeline):
            folder = layout.step_dir(self.job_dir, i, step.kind)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "fingerprint").write_text(self.fingerprints[i] + "\n")

    def _initial_model(self) -> nn.Module:
        return initial_model(self.spec, self.tokenizer, self.device)

    def _done_prefix(self) -> list[dict[str, Any]]:
        """done.json of the leading finished steps (a step after an unfinished one reruns).

        A done.json that is not a valid record of its step (``records.DoneRecord``; torn, edited,
        ``[]``) counts as absent: the step runs again, with a line on stderr saying so, and the
        file is moved aside (``done.json.invalid``) so it is neither read nor uploaded again."""
        out: list[dict[str, Any]] = []
        for i, step in enumerate(self.spec.pipeline):

            def mismatch(done: records.DoneRecord, i: int = i, kind: str = step.kind) -> str | None:
                if (done.index, done.kind) == (i, kind):
                    return None
                return f"it records steps[{done.index}] ({done.kind}), not steps[{i}] ({kind})"

            path = layout.step_dir(self.job_dir, i, step.kind) / DONE_FILE
            # every rank reads (rank 0's view wins); one says so
            done = records.finished_step(path, mismatch, f"steps[{i}] ({step.kind})", announce=dist.is_main())
            if done is None:
                break
            out.append(done)
        return out

    def _read_results(self) -> dict[str, Any]:
        results: dict[str, Any] = {
            "name": self.spec.name,
            "steps": [],
            "attempt": self.attempt,
            "device": str(self.device),
            "dry_run": self.job.dry_run,
        }
        try:
            old = records.read(records.ResultsFile, self.results_path)
        except FileNotFoundError:
            return results
        except (OSError, records.InvalidRecord) as exc:
            if dist.is_main():
                reason = str(exc) if isinstance(exc, records.InvalidRecord) else f"{self.results_path}: {exc}"
                records.warn(f"{reason}; it is written afresh (the baseline is measured again)")
            return results
        if old.name == self.spec.name and old.baseline is not None:
            results["baseline"] = old.baseline
            if old.final is not None:
                results["final"] = old.final
        return results

    def _record(self, results: dict[str, Any], done: dict[str, Any], *, skipped: bool) -> None:
        entry = {k: done.get(k) for k in ("index", "kind", "output", "metrics", "wall_s", "extra")}
        entry.update({k: done[k] for k in ("variant", "variant_step") if k in done})  # a compare variant's step
        results["steps"].append(entry)
        self._write_results(results)
        self.emitter.emit(
            "step_done",
            index=entry["index"],
            kind=entry["kind"],
            output=entry["output"],
            wall_s=entry["wall_s"],
            metrics=finite(entry["metrics"]),
            skipped=skipped,
            **{k: entry[k] for k in ("variant", "variant_step") if k in entry},
        )

    def _write_results(self, results: dict[str, Any]) -> None:
        if dist.is_main():
            layout.write_json_atomic(self.results_path, finite(results))


def main(argv: list[str] | None = None, *, hard_deadline: bool = False) -> int:
    args = sys.argv[1:] if argv is None else argv
    emitter = dist.emitter()  # rank 0 reports; other ranks only their errors
    if len(args) != 2 or args[0] != "run":
        usage = "usage: python -m optjob.steps run JOB_DIR"
        print(usage, file=sys.stderr)
        emitter.emit("error", message=usage, error_type="UsageError")
        return EXIT_BAD_JOB
    job_dir = Path(args[1]).resolve()
    try:
        job = layout.JobFile.read(job_dir)
        spec = JobSpec.model_validate(job.spec)
        attempt = int(os.environ.get("OPTJOB_ATTEMPT") or 1)
        deadline = float(os.environ["OPTJOB_DEADLINE"]) if os.environ.get("OPTJOB_DEADLINE") else None
    except (OSError, ValueError, TypeError) as exc:
        emitter.emit(
            "error",
            message=f"bad job file {job_dir / layout.JOB_FILE} (or OPTJOB_* variable): {exc}",
            error_type=type(exc).__name__,
        )
        return EXIT_BAD_JOB
    stop = StopFlag(deadline)
    stop.install()
    runner = Job(job_dir, job, spec, attempt, stop, emitter)
    # The workload process (``python -m optjob.steps``) ends itself at the deadline whatever it is doing;
    # an in-process call (tests, tools) keeps its host alive.
    dog = watchdog.arm(deadline, lambda: emitter.emit("stopped", index=runner.index, reason="deadline-hard",
                                                      step=None)) if hard_deadline else None
    try:
        runner.phases.enter("starting")
        runner.sync = from_env(job_dir)
        if runner.sync is not None:
            with runner.phases.span("pull"):
                runner.sync.start()  # pull what earlier attempts saved; push each checkpoint from now on
        runner.run()
    except StopRequested as exc:
        print(f"stopped: {exc.reason}", file=sys.stderr, flush=True)
        emitter.emit("stopped", index=runner.index, reason=exc.reason, step=exc.step)
        dist.teardown()
        return EXIT_DEADLINE if exc.reason == "deadline" else EXIT_SIGNAL
    except Exception as exc:
        traceback.print_exc()
        emitter.emit(
            "error",
            message=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            index=runner.index,
        )
        return EXIT_FAILED  # no dist.teardown: the other ranks may be stuck in a collective
    finally:
        if dog is not None:
            dog.disarm()
        if runner.sync is not None:
            runner.sync.close()
    dist.teardown()
    return EXIT_OK
