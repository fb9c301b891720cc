"""The dry run's proxy: the spec's own pipeline on a tiny model, a slice of the data and a few
optimizer steps, so every code path of a real run executes in seconds on a laptop CPU."""

from __future__ import annotations

import sys
from typing import Any

from optjob.specs import JobSpec
from optjob.specs.model import ModelInit

from .data import DRY_RUN_CHARS
from .modeling import model_family

#: What a dry run caps, per step kind: field -> the most it may be.
_TRAIN_CAPS = {"max_steps": 5, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 2,
               "log_every": 1, "eval_batches": 2, "eval_every": 2}  # fmt: skip
DRY_RUN_CAPS: dict[str, dict[str, int]] = {
    "train": _TRAIN_CAPS,
    "distill": _TRAIN_CAPS,
    "prune": {"recover_steps": 5, "batch_size": 4},
    "hpo": {"trials": 2, "trial_steps": 3},
    "evaluate": {"max_batches": 2, "batch_size": 4, "latency_repeats": 2, "generate_tokens": 8},
    "quantize": {"group_size": 32},
}
#: The dry run's model: 2 layers, 64 wide, 2 heads, MLP 128, vocab <= 512.
DRY_RUN_MODEL = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128}


def proxy_spec(spec: JobSpec) -> JobSpec:
    """The dry-run version of ``spec``: the same pipeline on a tiny model, a slice of the
    data and a few optimizer steps, so every code path runs in seconds."""
    d = spec.model_dump(mode="json")
    init = d["model"]["init"] or {"family": model_family(spec.model), "vocab": 512}
    kv = init.get("kv_heads")
    init = {**init, **DRY_RUN_MODEL, "vocab": min(int(init.get("vocab", 512)), 512),
            "kv_heads": None if kv is None or kv >= init.get("heads", 4) else 1}  # fmt: skip
    d["model"] = {"init": init, "tokenizer": "builtin"}
    data = d["data"]
    if spec.data.kind == "hf":
        # A laptop rehearsal must not depend on the hub (the model is built from its family too).
        print(f"dry run: using builtin:python-docs in place of {spec.data.source}", file=sys.stderr, flush=True)
        data["source"] = "builtin:python-docs"
        data["format"] = None  # the builtin corpus is text
    if str(data.get("eval_source") or "").startswith("hf:"):
        data["eval_source"] = None
    data["max_chars"] = min(data["max_chars"] or DRY_RUN_CHARS, DRY_RUN_CHARS)
    data["seq_len"] = min(data["seq_len"], 64)
    for entry in d["steps"]:
        _shrink_entry(entry, spec.model.init)
    return JobSpec.model_validate(d)


def _shrink_entry(entry: dict[str, Any], teacher: ModelInit | None) -> None:
    """One step of the dry run's pipeline made small; a ``compare`` step's variants each in turn."""
    kind, body = next(iter(entry.items()))
    if kind == "compare":
        for steps in body.values():
            for inner in steps:
                _shrink_entry(inner, teacher)
        return
    if kind == "evaluate" and body["max_batches"] is None:
        body["max_batches"] = 2
    for key, cap in DRY_RUN_CAPS.get(kind, {}).items():
        if body.get(key) is not None:
            body[key] = min(body[key], cap)
    if "warmup_steps" in body:
        body["warmup_steps"] = min(body["warmup_steps"], body["max_steps"])
    if kind == "distill":
        _shrink_student(body["student"], teacher)
    if kind == "quantize" and body.get("method") == "int4-weight":
        # torchao's int4 weight-only kernels need CUDA: the rehearsal quantizes to 4 bits by rounding instead.
        print("dry run: quantize int4-weight rehearsed as rtn 4-bit (int4-weight needs a CUDA GPU)",
              file=sys.stderr, flush=True)
        body.update(method="rtn", bits=4)
    if kind == "train" and (body.get("adapter") or {}).get("method") == "qlora":
        # bitsandbytes' 4-bit needs CUDA: the rehearsal trains the same adapter on the model as it is.
        print("dry run: adapter method qlora rehearsed as lora (4-bit needs a CUDA GPU)",
              file=sys.stderr, flush=True)
        body["adapter"]["method"] = "lora"


def _shrink_student(s: dict[str, Any], teacher: ModelInit | None) -> None:
    """Keep the student as much smaller than the (now tiny) teacher as it was."""

    def smaller(field: str) -> bool:
        if teacher is None:
            return False
        return bool(s[field] < (teacher.mlp_width if field == "intermediate" else getattr(teacher, field)))

    for field, tiny, full in (("layers", 1, 2), ("heads", 1, 2), ("intermediate", 64, 128)):
        if s.get(field):
            s[field] = tiny if smaller(field) else full
    if s.get("hidden"):
        s["hidden"] = 32
