"""11. Model families x steps: which step works on which family, which is refused at plan (and
why), which fails; every output reloaded with plain ``from_pretrained`` to its recorded loss,
quantized sizes against the parent checkpoint.

The models are ``benchmarks/tiny_families.py``'s (the test matrix of tests/steps/test_families.py):
2 layers, hidden 32, vocab 256, random weights, saved in their dtype. Each cell loads the parent
as the runner does, asks ``steps.families.unsupported`` about the step with the parent's
``config.json`` (what ``optjob plan`` asks: ``planner.refuse_unsupported``), runs the step
module's ``preflight`` and ``run`` in this process, measures the output's loss on the eval split,
saves it as the runner does and reloads it with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

from .common import Ctx

NAME = "families"
TITLE = "Model families x steps"
MEASURES = ("Tiny random models of 14 checkpoints (gpt2, llama untied/tied, mistral, qwen2, qwen3, phi3, phi, "
            "gpt_neox, opt, gemma, gemma2, a bf16 llama, a tied fp16 qwen3; benchmarks/tiny_families.py) through "
            "every step (train, also with `precision: checkpoint`; magnitude, structured (heads and MLP, MLP "
            "only), Wanda and SparseGPT pruning; distillation into a narrower student by copied layers and from "
            "random; int8-dynamic, int8-weight, GPTQ and RTN int4, fp16 and "
            "bf16 casts, LoRA), each run by its step module in-process: ok, refused at plan (the reason "
            "`optjob plan` gives from config.json), or failed; each output saved and reloaded with plain "
            "`from_pretrained`, its eval loss against the loss of the model in memory; on-disk size "
            "against the parent's.")
GOAL = ("every cell ok or refused at plan with a reason (none fails at run time); every output reloads to its "
        "recorded loss; no quantized output larger than its parent")
#: Counts and correctness, not timings: --quick runs it beside the timed comparisons.
BESIDE = True

_TRAIN = {"max_steps": 2, "lr": 1e-3, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 50, "log_every": 1}
_CAL = {"samples": 4}
#: column -> the step, as a spec writes it.
COLUMNS: dict[str, dict[str, Any]] = {
    "train": {"train": dict(_TRAIN)},
    "train (precision: checkpoint)": {"train": {**_TRAIN, "precision": "checkpoint"}},
    "magnitude": {"prune": {"sparsity": 0.5}},
    "structured": {"prune": {"method": "structured", "mlp_fraction": 0.5, "heads_fraction": 0.5}},
    "structured (MLP only)": {"prune": {"method": "structured", "mlp_fraction": 0.5}},
    "wanda": {"prune": {"method": "wanda", "sparsity": 0.5, "calibration": _CAL}},
    "sparsegpt": {"prune": {"method": "sparsegpt", "sparsity": 0.5, "calibration": _CAL}},
    "distill (copied layers)": {"distill": {**_TRAIN, "student": {"layers": 1, "intermediate": 32, "heads": 2}}},
    "distill (random, narrower)": {"distill": {**_TRAIN, "init": "random",
                                               "student": {"layers": 1, "hidden": 16, "heads": 2}}},
    "int8-dynamic": {"quantize": {"method": "int8-dynamic"}},
    "int8-weight": {"quantize": {"method": "int8-weight"}},
    "gptq int4": {"quantize": {"method": "gptq", "group_size": 16, "calibration": _CAL}},
    "rtn int4": {"quantize": {"method": "rtn", "group_size": 16}},
    "fp16": {"quantize": {"method": "fp16"}},
    "bf16": {"quantize": {"method": "bf16"}},
    "lora": {"train": {**_TRAIN, "adapter": {"method": "lora", "r": 4}}},
}
#: Columns whose cell also says the dtype the output was saved in.
SHOW_DTYPE = ("train (precision: checkpoint)",)
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUICK_FAMILIES = ["gpt2", "llama-tied", "opt", "qwen3-fp16"]
#: A reload "gives the recorded loss" within this relative tolerance.
RELOAD_RTOL = 1e-4


def run_cell(ckpt: Path, body: dict[str, Any], corpus: Any, work: Path) -> dict[str, Any]:
    """One family x step: ``{"status": ok|refused|failed, ...}``."""
    import torch
    from optjob.specs.errors import StepError
    from optjob.steps import families, runner
    from optjob.steps.evaluate import eval_loss
    from optjob.steps.modeling import count_params, load_model, model_size_bytes, save_model
    from transformers import AutoModelForCausalLM

    from .tiny_families import step_context

    cpu = torch.device("cpu")
    ctx = step_context(work, body, corpus)
    step = ctx.step
    config = json.loads((ckpt / "config.json").read_text())  # what plan reads
    found = families.unsupported(config, step)
    if found is not None:
        return {"status": "refused", "reason": str(found)}
    model = load_model(ckpt, cpu)
    t = time.perf_counter()
    try:
        runner.preflight(ctx.spec, cpu)
        out = runner.step_module(step.kind).run(ctx, step, model)
    except StepError as exc:
        return {"status": "failed", "reason": f"refused at run time: {exc}" + (f" ({exc.hint})" if exc.hint else "")}
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:160]} "
                                               f"({Path(tb.filename).name}:{tb.lineno})"}
    seconds = time.perf_counter() - t
    recorded = eval_loss(out.model, corpus, 4, 2, cpu)[0]
    folder = save_model(out.model, work / "model")
    again = AutoModelForCausalLM.from_pretrained(folder)
    reloaded = eval_loss(again, corpus, 4, 2, cpu)[0]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in again.parameters() if p.is_floating_point()})
    return {
        "status": "ok",
        "seconds": round(seconds, 3),
        "loss": recorded,
        "reloaded_loss": reloaded,
        "reloads": math.isclose(reloaded, recorded, rel_tol=RELOAD_RTOL, abs_tol=1e-5),
        "size_ratio": model_size_bytes(folder) / model_size_bytes(ckpt),
        "params_ratio": count_params(again) / count_params(load_model(ckpt, cpu)),
        "dtypes": dtypes,
        "quantized": getattr(again.config, "quantization_config", None) is not None,
    }


def cell_text(cell: dict[str, Any], column: str, notes: list[str]) -> str:
    """The table's cell: ok (reload mark, size vs parent for a quantize step), refused [n], FAILED [n]."""
    if cell["status"] != "ok":
        if cell["reason"] not in notes:
            notes.append(cell["reason"])
        ref = f"[{notes.index(cell['reason']) + 1}]"
        return f"refused {ref}" if cell["status"] == "refused" else f"**failed** {ref}"
    mark = "ok ✓" if cell["reloads"] else "ok, **reload differs**"
    if "quantize" in COLUMNS[column]:
        mark += f" {cell['size_ratio']:.2f}x"
    if column in SHOW_DTYPE:
        mark += " " + "/".join(_SHORT.get(d, d) for d in cell["dtypes"])
    return mark


def table(matrix: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one row per family, one column per step, then the numbered reasons."""
    columns = list(COLUMNS)
    notes: list[str] = []
    lines = ["| family | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for family, cells in matrix.items():
        lines.append(f"| {family} | " + " | ".join(cell_text(cells[c], c, notes) for c in columns) + " |")
    lines.append("")
    lines.append("ok ✓: the output, saved as the runner saves it, reloads with plain "
                 "`AutoModelForCausalLM.from_pretrained` to the loss of the model in memory (relative tolerance "
                 f"{RELOAD_RTOL:g}); 0.NNx: on-disk size against the parent checkpoint (quantize steps). Reasons:")
    lines.append("")
    lines.extend(f"{i + 1}. {text.replace('|', '/')}" for i, text in enumerate(notes))
    return "\n".join(lines)


def run(ctx: Ctx) -> dict[str, Any]:
    import torch

    from .tiny_families import NAMES, build_checkpoints, random_corpus

    torch.set_num_threads(1)
    names = QUICK_FAMILIES if ctx.quick else NAMES
    root = ctx.mkdtemp("families-")
    checkpoints = build_checkpoints(root / "parents", names)
    corpus = random_corpus()
    matrix: dict[str, dict[str, dict[str, Any]]] = {}
    for family in names:
        matrix[family] = {}
        for column, body in COLUMNS.items():
            work = root / family / column.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            matrix[family][column] = run_cell(checkpoints[family], body, corpus, work)
    cells = [c for row in matrix.values() for c in row.values()]
    ok = [c for c in cells if c["status"] == "ok"]
    refused = [c for c in cells if c["status"] == "refused"]
    failed = [c for c in cells if c["status"] == "failed"]
    differs = [c for c in ok if not c["reloads"]]
    bigger = [f"{f}/{col}" for f, row in matrix.items() for col, c in row.items()
              if c["status"] == "ok" and "quantize" in COLUMNS[col] and col not in ("fp16", "bf16")
              and c["size_ratio"] > 1.0]
    summary = (f"{len(names)} checkpoints x {len(COLUMNS)} steps: {len(ok)} ok ({len(ok) - len(differs)} reload to "
               f"their recorded loss), {len(refused)} refused at plan, {len(failed)} failed"
               + (f"; quantized larger than the parent: {', '.join(bigger)}" if bigger else ""))
    md = table(matrix)
    notes = ["--quick: 4 checkpoints (gpt2, llama-tied, opt, qwen3-fp16)"] if ctx.quick else []
    return {"summary": summary, "met": not failed and not differs and not bigger,
            "metrics": {"matrix": matrix, "readme_table": md, "failed": len(failed), "refused": len(refused),
                        "ok": len(ok), "reload_differs": len(differs), "larger_than_parent": bigger},
            "notes": notes}
