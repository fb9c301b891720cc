"""The manager-free baseline: ``python -m benchmarks.plain_pipeline SPEC WORKDIR`` does the work
``optjob apply SPEC --local`` does — the same data, tokenizer, model, baseline evaluation, step
functions, saved models and evaluation of each step's output model (the report's side-by-side
figures) — by calling the step functions directly, in one process, with no state store, plan,
provider, log ingestion or report. It ends as the workload does (``steps/shutdown.py``:
flush, then ``os._exit``, skipping most of a second of interpreter teardown), so the comparison
measures what the manager adds, not how the processes exit."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from optjob.specs import EvaluateStep, load_spec
    from optjob.steps.context import StepContext, StopFlag
    from optjob.steps.data import build_corpus, load_text
    from optjob.steps.device import pick_device, set_threads
    from optjob.steps.evaluate import evaluate_model
    from optjob.steps.events import Emitter
    from optjob.steps.layout import JobFile
    from optjob.steps.modeling import initial_model, save_model
    from optjob.steps.runner import cache_dir, step_module

    spec = load_spec(argv[0])
    work = Path(argv[1])
    device = pick_device("cpu")
    set_threads()
    cache = cache_dir(JobFile(spec={}))  # OPTJOB_CACHE, as the workload reads it
    text = load_text(spec.data, cache)
    from optjob.steps.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec, text, cache)
    corpus = build_corpus(spec, tokenizer, cache, dry_run=False, text=text)
    emitter, stop = Emitter(), StopFlag()

    def ctx(i: int, model_dir: Path | None) -> StepContext:
        return StepContext(spec=spec, job_dir=work, index=i, emitter=emitter, device=device, dry_run=False,
                           corpus=corpus, tokenizer=tokenizer, stop=stop, cache_dir=cache, model_dir=model_dir)

    model = initial_model(spec, tokenizer, device)
    results = {"baseline": evaluate_model(ctx(0, None), model, EvaluateStep()), "steps": []}
    model_dir = None
    for i, step in enumerate(spec.pipeline):
        c = ctx(i, model_dir)
        outcome = step_module(step.kind).run(c, step, model)
        model = outcome.model
        metrics = outcome.metrics
        if not isinstance(step, EvaluateStep):
            model_dir = save_model(model, c.step_dir() / "model", tokenizer)
            if step.kind != "hpo":  # as the runner: every step's output measured the same way
                metrics = {**evaluate_model(c, model, EvaluateStep(), model_dir), **metrics}
        results["steps"].append({"kind": step.kind, "metrics": metrics})
    (work / "results.json").write_text(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    from optjob.steps.shutdown import exit_now

    exit_now(main(sys.argv[1:]))
