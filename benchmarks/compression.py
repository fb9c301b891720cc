"""5. Compression outcomes: size, perplexity and forward latency of every step's model in the
quickstart pipeline against the trained model, plus the issue-3 figures (prune, int8, distill
against the same student trained from scratch for the same steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .common import OPTJOB, PYTHON, REPO, Ctx, base_env, last_json, median, run_cmd, write_spec

NAME = "compression"
TITLE = "Compression outcomes"
MEASURES = ("Runs the quickstart pipeline (`examples/quickstart.yaml`: 4 layers x 256, train 300 steps, magnitude "
            "prune 50% + 50 recovery steps, distil into 2 layers for 120 steps, int8-dynamic) with `optjob apply "
            "--local` (or reads a finished job folder given with `--quickstart`), and trains the same 2-layer "
            "student from random init with plain cross-entropy and the distil step's options (`train_loop`, "
            "as a train step). Then loads every step's saved model and measures "
            "state-dict bytes, perplexity on the whole eval split and single-sequence forward latency (models "
            "interleaved, one thread, CPU time), each against the model it came from.")
#: Its figures are sizes, perplexities and a CPU-time latency ratio within one process: ``--quick`` runs it
#: beside the timed comparisons (benchmarks/__main__.py).
BESIDE = True
GOAL = ("prune 50%+recovery: perplexity within 5% of trained; int8-dynamic: state dict <= 1/2, perplexity within "
        "1%, latency <= fp32; distilled student: perplexity below the scratch student's")

QUICK_SPEC = """\
name: bench-compress
model:
  init: {family: llama, layers: 2, hidden: 128, heads: 4, intermediate: 384, vocab: 2048}
data:
  source: builtin:python-docs
  seq_len: 64
  max_chars: 600000
steps:
  - train: {max_steps: 40, lr: 3.0e-3, batch_size: 8, warmup_steps: 10, precision: bf16, seed: 0}
  - prune: {method: magnitude, sparsity: 0.5, recover_steps: 10, lr: 3.0e-4}
  - distill: {student: {layers: 1}, init: teacher_layers, max_steps: 20, lr: 2.0e-3, warmup_steps: 5,
              temperature: 2.0, alpha: 0.5, batch_size: 8, precision: bf16}
  - quantize: {method: int8-dynamic}
  - evaluate: {metrics: [perplexity], max_batches: 4}
resources: {cloud: local, hourly_usd: 0.1}
budget: {max_usd: 1.0, max_hours: 1}
"""


def _steps(job_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(the job's resolved spec, step kind -> its saved model folder)."""
    spec = json.loads((job_dir / "job.json").read_text())["spec"]
    models: dict[str, Path] = {}
    for i, entry in enumerate(spec["steps"]):
        kind = next(iter(entry))
        folder = job_dir / "steps" / f"{i:02d}-{kind}" / "model"
        if kind != "evaluate":
            if not folder.is_dir():
                raise RuntimeError(f"{job_dir}: step {i} ({kind}) has no saved model: is the job finished?")
            models.setdefault(kind, folder)
    return spec, models


def train_scratch(spec: Any, tok: Any, corpus: Any, work: Path) -> tuple[Any, float]:
    """The distil step's student, from random init, trained with plain cross-entropy and the distil
    step's own options (steps, lr, schedule, batch, precision, seed) by ``train_loop``, as a
    ``train`` step would: (model, seconds)."""
    import io
    import time

    import torch
    from optjob.specs import TrainStep
    from optjob.specs.steps import TrainOptions
    from optjob.steps.context import StepContext, StopFlag
    from optjob.steps.events import Emitter
    from optjob.steps.modeling import build_model
    from optjob.steps.train import train_loop

    distill = next(s for s in spec.pipeline if s.kind == "distill")
    opts = TrainStep(**{k: getattr(distill, k) for k in TrainOptions.model_fields})
    student = {k: v for k, v in distill.student.model_dump().items() if v is not None}
    init = type(spec.model.init).model_validate({**spec.model.init.model_dump(), **student})
    special = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = build_model(init, len(tok), opts.seed, **special)
    ctx = StepContext(spec=spec, job_dir=work, index=0, emitter=Emitter(io.StringIO()), device=torch.device("cpu"),
                      dry_run=False, corpus=corpus, tokenizer=tok, stop=StopFlag())
    t = time.perf_counter()
    train_loop(ctx, model, opts, emit=False, checkpoints=False)
    return model.eval(), time.perf_counter() - t


def measure(job_dir: Path, quick: bool, work: Path) -> dict[str, Any]:
    """In a child process: train the scratch student, load each step's model, measure them all."""
    import time

    import torch
    from optjob.specs import JobSpec
    from optjob.steps.data import build_corpus, load_text
    from optjob.steps.device import set_threads
    from optjob.steps.evaluate import eval_loss, perplexity
    from optjob.steps.layout import JobFile
    from optjob.steps.modeling import count_params, load_model, nonzero_params
    from optjob.steps.quantize import state_dict_bytes
    from optjob.steps.runner import cache_dir
    from optjob.steps.tokenizer import from_pretrained

    set_threads()  # training and perplexity on every core, as the workload runs them
    raw, folders = _steps(job_dir)
    spec = JobSpec.model_validate(raw)
    cache = cache_dir(JobFile.read(job_dir))
    tok = from_pretrained(str(folders["train"]))
    corpus = build_corpus(spec, tok, cache, dry_run=False, text=load_text(spec.data, cache))
    names = {"trained": folders["train"], "pruned": folders.get("prune"), "distilled": folders.get("distill"),
             "quantized": folders.get("quantize")}
    models = {k: load_model(v, "cpu").eval() for k, v in names.items() if v is not None}
    out: dict[str, Any] = {"eval_tokens": corpus.eval_windows() * corpus.seq_len, "models": {}}
    if "distill" in folders:
        models["scratch student"], out["scratch_train_s"] = train_scratch(spec, tok, corpus, work)
    max_batches = 4 if quick else None
    for name, model in models.items():
        loss, acc = eval_loss(model, corpus, 8, max_batches, torch.device("cpu"))
        out["models"][name] = {"state_dict_bytes": state_dict_bytes(model), "perplexity": perplexity(loss),
                               "accuracy": acc, "params": count_params(model),
                               "nonzero_params": nonzero_params(model), "folder": str(names.get(name))}
    torch.set_num_threads(1)  # latency: one thread, CPU time (see throughput.py)
    seq = corpus.eval_ids[: corpus.seq_len][None]
    times: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(input_ids=seq, use_cache=False)
        for _ in range(10 if quick else 40):
            for name, model in models.items():
                c, w = time.thread_time(), time.perf_counter()
                model(input_ids=seq, use_cache=False)
                times[name]["cpu"].append(time.thread_time() - c)
                times[name]["wall"].append(time.perf_counter() - w)
    for name in models:
        out["models"][name]["latency_ms"] = {k: 1000 * median(v) for k, v in times[name].items()}
    return out


def _check(m: dict[str, Any]) -> dict[str, Any]:
    t, p, d, q, s = (m.get(k) or {} for k in ("trained", "pruned", "distilled", "quantized", "scratch student"))
    c: dict[str, Any] = {}
    if p:
        c["prune_ppl_ratio"] = p["perplexity"] / t["perplexity"]
        c["prune_ok"] = c["prune_ppl_ratio"] <= 1.05
    if q and d:
        c["int8_size_ratio"] = q["state_dict_bytes"] / d["state_dict_bytes"]
        c["int8_ppl_ratio"] = q["perplexity"] / d["perplexity"]
        c["int8_latency_ratio"] = q["latency_ms"]["cpu"] / d["latency_ms"]["cpu"]
        c["int8_latency_ratio_wall"] = q["latency_ms"]["wall"] / d["latency_ms"]["wall"]
        c["int8_ok"] = c["int8_size_ratio"] <= 0.5 and c["int8_ppl_ratio"] <= 1.01 and c["int8_latency_ratio"] <= 1.0
    if d and s:
        c["same_student_shape"] = d["params"] == s["params"]
        c["distill_vs_scratch_ppl"] = [d["perplexity"], s["perplexity"]]
        c["distill_ok"] = d["perplexity"] < s["perplexity"]
    return c


def run(ctx: Ctx) -> dict[str, Any]:
    home = ctx.mkdtemp("home-")
    env = base_env(OPTJOB_HOME=str(home))
    given = ctx.options.get("quickstart")
    phase: dict[str, float] = {}
    notes = []
    if given:
        job_dir = Path(given).expanduser().resolve()
        notes.append(f"pipeline read from {job_dir} (not run here)")
    else:
        spec = write_spec(ctx.tmp / "specs", "bench-compress", QUICK_SPEC) if ctx.quick else \
            REPO / "examples" / "quickstart.yaml"
        phase["pipeline_s"], proc = run_cmd([OPTJOB, "apply", str(spec), "--local", "--yes", "--json"], env=env,
                                            timeout=1800)
        job_dir = Path(last_json(proc.stdout)["job_dir"])
    args = [PYTHON, "-m", "benchmarks.compression", str(job_dir), str(ctx.mkdtemp("scratch-"))] + (
        ["--quick"] if ctx.quick else [])
    phase["measure_s"], proc = run_cmd(args, env=base_env(), timeout=1200)
    m = last_json(proc.stdout)
    m["phase_s"] = phase
    c = _check(m["models"])
    m["checks"] = c
    mm = m["models"]
    parts = [f"{name}: {v['state_dict_bytes'] / 1e6:.2f} MB, ppl {v['perplexity']:.1f}, "
             f"{v['latency_ms']['cpu']:.1f} ms" for name, v in mm.items()]
    figures = []
    if "prune_ppl_ratio" in c:
        figures.append(f"prune ppl x{c['prune_ppl_ratio']:.3f} of trained")
    if "int8_size_ratio" in c:
        figures.append(f"int8 size x{c['int8_size_ratio']:.2f}, ppl x{c['int8_ppl_ratio']:.4f}, latency "
                       f"x{c['int8_latency_ratio']:.2f} (CPU time; wall x{c['int8_latency_ratio_wall']:.2f}) of "
                       f"the fp32 student")
    if "distill_vs_scratch_ppl" in c:
        figures.append("distilled student ppl {:.1f} vs scratch {:.1f}".format(*c["distill_vs_scratch_ppl"]))
    summary = "; ".join(figures) + ". Per model: " + "; ".join(parts)
    oks = [c[k] for k in ("prune_ok", "int8_ok", "distill_ok") if k in c]
    met = all(oks) if oks and not ctx.quick else None
    if ctx.quick:
        notes.append("--quick runs a 2x128 model for 40 steps (student 1 layer, 20 steps): not the issue-3 "
                     "configuration, so the goal is judged on the full run only")
    return {"summary": summary, "met": met, "metrics": m, "notes": notes}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), "--quick" in sys.argv[3:], Path(sys.argv[2]))))
