"""10. One-shot LLM compression: on the quickstart's trained 4 x 256 Llama, Wanda and SparseGPT at 50%
(unstructured and 2:4) against magnitude, and GPTQ against round-to-nearest at the same bits and group
size, each as perplexity on the whole eval split; the papers' figures beside ours."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import CACHE, PYTHON, REPO, Ctx, base_env, last_json, run_cmd

NAME = "compression_llm"
TITLE = "One-shot LLM compression"
MEASURES = ("Trains the quickstart model (`examples/quickstart.yaml`'s model, data and train step: 4 layers x 256, "
            "300 steps) with the workload's runner (`python -m optjob.steps run`) in a temporary folder, or reads "
            "the train step of a finished quickstart job given with `--quickstart`. Then, on copies of that model: "
            "magnitude (optjob's global L1), Wanda and SparseGPT at 50% unstructured and 2:4, calibrated on 128 "
            "windows of 128 tokens of the train split; RTN and GPTQ at 4 bits (and 3, through the library), group "
            "128; perplexity of each on the whole eval split, and the wall time of each method. GPTQ/RTN 4-bit are "
            "measured as stored (torchao int4 tensors, `quantize.quantize_model`).")
#: Quality figures, not timings against a peer: ``--quick`` runs it beside the timed comparisons.
BESIDE = True
GOAL = ("50% one-shot: Wanda and SparseGPT perplexity below magnitude's (unstructured and 2:4); 4-bit g128: GPTQ "
        "perplexity below RTN's")

#: The papers' figures (perplexity on WikiText2; ours is on the job's eval split, so only the orderings and
#: rough ratios compare). Wanda's README (github.com/locuslab/wanda), LLaMA-2-7B; GPTQ paper (arXiv
#: 2210.17323) Table 3, OPT-125M, per-row 4-/3-bit (no grouping).
PAPERS: dict[str, dict[str, Any]] = {
    "pruning": {"source": "Wanda (arXiv 2306.11695), LLaMA-2-7B, WikiText2, github.com/locuslab/wanda README",
                "dense": 5.12,
                "unstructured": {"magnitude": 14.89, "sparsegpt": 6.51, "wanda": 6.42},
                "2:4": {"magnitude": 54.59, "sparsegpt": 10.17, "wanda": 11.02}},
    "quantization": {"source": "GPTQ (arXiv 2210.17323) Table 3, OPT-125M, WikiText2, per-row",
                     "dense": 27.65, "rtn4": 37.28, "gptq4": 31.12, "rtn3": 1.3e3, "gptq3": 53.85},
}

QUICK_INIT = {"family": "llama", "layers": 2, "hidden": 128, "heads": 4, "intermediate": 384, "vocab": 2048}
GROUP = 128
SAMPLES = 128
#: Eval batches (of 8 windows) on which each variant's next-token distribution is compared with the dense model's.
KL_BATCHES = 8


def _train_spec(quick: bool) -> dict[str, Any]:
    """The quickstart's model, data and train step (``--quick``: a 2 x 128 model, 40 steps)."""
    import yaml

    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    train = next(s["train"] for s in spec["steps"] if "train" in s)
    spec = {"name": "bench-llm-compress", "model": spec["model"], "data": spec["data"], "steps": [{"train": train}],
            "resources": {"cloud": "local", "hourly_usd": 0.1}, "budget": {"max_usd": 1.0, "max_hours": 1}}
    if quick:
        spec["model"] = {**spec["model"], "init": QUICK_INIT}
        spec["data"] = {**spec["data"], "seq_len": 64, "max_chars": 600_000}
        spec["steps"] = [{"train": {**train, "max_steps": 40, "warmup_steps": 10}}]
    return spec


def train(work: Path, quick: bool) -> Path:
    """Run the train step with the workload's runner; the job folder."""
    from optjob.steps.layout import JobFile

    folder = work / "job"
    # Only the trained model is needed: the runner's baseline/final evaluations kept tiny, none per step.
    JobFile(spec=_train_spec(quick), dry_run=False, device="cpu", cache_dir=str(CACHE),
            extra={"auto_evaluate": {"metrics": ["perplexity"], "max_batches": 1}, "evaluate_each_step": False},
            ).write(folder)  # fmt: skip
    run_cmd([PYTHON, "-m", "optjob.steps", "run", str(folder)], env=base_env(), timeout=3600)
    return folder


def measure(job_dir: Path, quick: bool) -> dict[str, Any]:
    """In a child process: every variant of the trained model, its perplexity and how long it took."""
    import torch
    from optjob.specs import JobSpec
    from optjob.steps import calibration, gptq, prune, quantize, sparsegpt, wanda
    from optjob.steps.data import build_corpus, load_text
    from optjob.steps.device import set_threads
    from optjob.steps.evaluate import eval_loss, perplexity
    from optjob.steps.layout import JobFile
    from optjob.steps.modeling import load_model
    from optjob.steps.runner import cache_dir
    from optjob.steps.tokenizer import from_pretrained

    set_threads()
    job = JobFile.read(job_dir)
    spec = JobSpec.model_validate(job.spec)
    index = next(i for i, s in enumerate(spec.pipeline) if s.kind == "train")
    folder = job_dir / "steps" / f"{index:02d}-train" / "model"
    cache = cache_dir(job)
    tok = from_pretrained(str(folder))
    corpus = build_corpus(spec, tok, cache, dry_run=False, text=load_text(spec.data, cache))
    base = load_model(folder, "cpu").eval()
    ids = calibration.windows(corpus.train_ids, SAMPLES, corpus.seq_len, seed=0)
    cpu = torch.device("cpu")
    rows: dict[str, dict[str, Any]] = {}
    probe = list(corpus.eval_batches(8, KL_BATCHES))

    def log_probs(model: Any) -> list[Any]:
        with torch.no_grad():
            return [torch.log_softmax(model(input_ids=b[:, :-1], use_cache=False).logits.float(), -1) for b in probe]

    dense_lp = log_probs(base)

    def kl_to_dense(model: Any) -> float:
        """Mean KL(dense || variant) per token, nats: more sensitive than perplexity."""
        total = count = 0.0
        for p, q in zip(dense_lp, log_probs(model), strict=True):
            total += float((p.exp() * (p - q)).sum())
            count += p.shape[0] * p.shape[1]
        return total / count

    def record(name: str, make: Any) -> None:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        out = make(model)  # a new model (quantize_model), or masks / grids (changed in place)
        if isinstance(out, torch.nn.Module):
            model = out
        took = time.perf_counter() - t
        loss, _ = eval_loss(model, corpus, 8, None, cpu)
        try:
            sparsity: float | None = prune.linear_sparsity(model)
        except (RuntimeError, NotImplementedError, TypeError):  # torchao weights: not counted here
            sparsity = None
        rows[name] = {"perplexity": perplexity(loss), "kl_to_dense": kl_to_dense(model), "seconds": round(took, 2),
                      "sparsity": sparsity, "state_dict_bytes": quantize.state_dict_bytes(model)}

    record("dense", lambda m: None)
    for pattern in ("unstructured", "2:4"):
        tag = "50%" if pattern == "unstructured" else "2:4"
        record(f"magnitude {tag}", lambda m, p=pattern: prune.magnitude_prune(m, 0.5) if p == "unstructured"
               else prune.magnitude_nm(m, p))
        record(f"wanda {tag}", lambda m, p=pattern: wanda.prune_model(m, ids, 0.5, p, cpu))
        record(f"sparsegpt {tag}", lambda m, p=pattern: sparsegpt.prune_model(m, ids, 0.5, p, cpu))
    # How much the decoder layers matter at all: a short-trained model leans on its embeddings.
    record("magnitude 90% (probe)", lambda m: prune.magnitude_prune(m, 0.9))
    for bits in (4,):  # the step's path: codes stored as torchao tensors
        record(f"rtn int{bits} g{GROUP}", lambda m, b=bits: quantize.quantize_model(m, "rtn", GROUP, cpu, bits=b))
        record(f"gptq int{bits} g{GROUP}", lambda m, b=bits: quantize.quantize_model(
            m, "gptq", GROUP, cpu, bits=b, calibration_ids=ids))
    for bits in (3,):  # beyond the spec's 4/8: the library, weights left dequantized in fp32
        record(f"rtn int{bits} g{GROUP}", lambda m, b=bits: gptq.quantize_model(m, None, b, GROUP, cpu))
        record(f"gptq int{bits} g{GROUP}", lambda m, b=bits: gptq.quantize_model(m, ids, b, GROUP, cpu))
    return {"rows": rows, "eval_tokens": corpus.eval_windows() * corpus.seq_len,
            "calibration": [SAMPLES, corpus.seq_len], "model_folder": str(folder)}


def _checks(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    ppl = {k: v["perplexity"] for k, v in rows.items()}
    out = {}
    for tag in ("50%", "2:4"):
        out[f"wanda<magnitude {tag}"] = ppl[f"wanda {tag}"] < ppl[f"magnitude {tag}"]
        out[f"sparsegpt<magnitude {tag}"] = ppl[f"sparsegpt {tag}"] < ppl[f"magnitude {tag}"]
    out[f"gptq<rtn int4 g{GROUP}"] = ppl[f"gptq int4 g{GROUP}"] < ppl[f"rtn int4 g{GROUP}"]
    return out


def _kl_checks(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The same orderings by KL to the dense model (reported, not part of the goal)."""
    kl = {k: v["kl_to_dense"] for k, v in rows.items()}
    out = {}
    for tag in ("50%", "2:4"):
        for method in ("wanda", "sparsegpt"):
            out[f"{method}<magnitude {tag}"] = kl[f"{method} {tag}"] < kl[f"magnitude {tag}"]
    for bits in (4, 3):
        out[f"gptq<rtn int{bits} g{GROUP}"] = kl[f"gptq int{bits} g{GROUP}"] < kl[f"rtn int{bits} g{GROUP}"]
    return out


def table(m: dict[str, Any]) -> str:
    """The markdown table: ours beside the papers' figures (perplexity; x = ratio to dense)."""
    rows = m["rows"]
    dense = rows["dense"]["perplexity"]
    pp, pq = PAPERS["pruning"], PAPERS["quantization"]
    paper = {"dense": (pp["dense"], pq["dense"])}
    for tag, key in (("50%", "unstructured"), ("2:4", "2:4")):
        for method in ("magnitude", "wanda", "sparsegpt"):
            paper[f"{method} {tag}"] = (pp[key][method], pp["dense"])
    for bits in (4, 3):
        for method in ("rtn", "gptq"):
            paper[f"{method} int{bits} g{GROUP}"] = (pq[f"{method}{bits}"], pq["dense"])
    lines = ["| variant | our ppl | x dense | KL to dense (nats/token) | paper ppl | paper x dense | state dict | "
             "method time |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ref = paper.get(name)
        p_ppl, p_x = ("", "") if ref is None or name == "dense" else (f"{ref[0]:,.2f}", f"x{ref[0] / ref[1]:.2f}")
        if name == "dense":
            p_ppl = f"{pp['dense']} (LLaMA-2-7B) / {pq['dense']} (OPT-125M)"
        lines.append(f"| {name} | {r['perplexity']:.2f} | x{r['perplexity'] / dense:.3f} | {r['kl_to_dense']:.2e} | "
                     f"{p_ppl} | {p_x} | {r['state_dict_bytes'] / 1e6:.2f} MB | {r['seconds']:.1f} s |")
    return "\n".join(lines)


def run(ctx: Ctx) -> dict[str, Any]:
    given = ctx.options.get("quickstart")
    notes = []
    phase: dict[str, float] = {}
    if given:
        job_dir = Path(given).expanduser().resolve()
        notes.append(f"trained model read from {job_dir} (not trained here)")
    else:
        t = time.perf_counter()
        job_dir = train(ctx.mkdtemp("llm-"), ctx.quick)
        phase["train_s"] = round(time.perf_counter() - t, 1)
    args = [PYTHON, "-m", "benchmarks.compression_llm", str(job_dir)] + (["--quick"] if ctx.quick else [])
    phase["measure_s"], proc = run_cmd(args, env=base_env(), timeout=3600)
    m = last_json(proc.stdout)
    m["phase_s"] = phase
    m["checks"] = _checks(m["rows"])
    m["kl_checks"] = _kl_checks(m["rows"])
    m["papers"] = PAPERS
    m["table"] = table(m)
    rows = m["rows"]

    def fig(name: str) -> str:
        return f"{rows[name]['perplexity']:.2f} (KL {rows[name]['kl_to_dense']:.1e})"

    summary = (f"ppl (KL to dense, nats/token): dense {rows['dense']['perplexity']:.2f}; 50%: magnitude "
               f"{fig('magnitude 50%')}, wanda {fig('wanda 50%')}, sparsegpt {fig('sparsegpt 50%')}; 2:4: magnitude "
               f"{fig('magnitude 2:4')}, wanda {fig('wanda 2:4')}, sparsegpt {fig('sparsegpt 2:4')}; int4 g{GROUP}: "
               f"rtn {fig(f'rtn int4 g{GROUP}')}, gptq {fig(f'gptq int4 g{GROUP}')}; int3 g{GROUP}: rtn "
               f"{fig(f'rtn int3 g{GROUP}')}, gptq {fig(f'gptq int3 g{GROUP}')}. Papers (WikiText2 ppl): LLaMA-2-7B "
               "dense 5.12, 50% magnitude 14.89 / wanda 6.42 / sparsegpt 6.51, 2:4 54.59 / 11.02 / 10.17; OPT-125M "
               "fp16 27.65, 4-bit per-row RTN 37.28 / GPTQ 31.12, 3-bit 1.3e3 / 53.85")
    notes.append("ours: perplexity on the job's own eval split (builtin:python-docs), not WikiText2; the papers' "
                 "models are 1,000-30,000x larger, so compare orderings and ratios to dense, not values")
    probe = rows["magnitude 90% (probe)"]["perplexity"] / rows["dense"]["perplexity"]
    weak = (": this short-trained model leans on its embeddings, so the 50% and 4-bit variants move perplexity by "
            "well under 1%; the KL column resolves the differences") if probe < 1.5 else ""
    notes.append(f"magnitude at 90% sparsity (a probe of how much the decoder layers matter): ppl x{probe:.2f} of "
                 f"dense{weak}")
    failed = [k for k, ok in m["kl_checks"].items() if not ok]
    notes.append("by KL to dense every ordering of the goal holds" if not failed else
                 "by KL to dense these orderings do not hold: " + ", ".join(failed))
    if ctx.quick:
        notes.append("--quick: a 2x128 model trained 40 steps, not the quickstart's: the goal is judged on the full "
                     "run only")
    met = all(m["checks"].values()) if not ctx.quick else None
    return {"summary": summary, "met": met, "metrics": m, "notes": notes}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), "--quick" in sys.argv[2:])))
