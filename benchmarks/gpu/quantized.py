"""The quantize step (``steps/quantize.py``'s ``run``) on the device: ``int4-weight`` (torchao, CUDA
only), and ``gptq`` / ``rtn`` at 4 bits. As the runner does, the step's model is saved
(``save_model``) and evaluated in memory (the recorded loss); then the folder is loaded with plain
``AutoModelForCausalLM.from_pretrained`` and evaluated again: the two losses must agree."""

from __future__ import annotations

import math
from typing import Any

from .bench import Bench
from .harness import CheckFailed, last_line, need_module

#: Reloaded loss / recorded loss may differ from 1 by at most this (same codes, same kernels).
TOLERANCE = 0.005
NAMES = ("quantize_int4_weight", "quantize_gptq_int4", "quantize_rtn_int4")


def cases(b: Bench) -> dict[str, tuple[dict[str, Any], bool]]:
    """name -> (quantize options, CUDA only)."""
    g = b.sizes.group_size
    return {
        "quantize_int4_weight": ({"method": "int4-weight", "group_size": g}, True),
        "quantize_gptq_int4": ({"method": "gptq", "bits": 4, "group_size": g,
                                "calibration": {"samples": b.sizes.calibration_samples}}, False),
        "quantize_rtn_int4": ({"method": "rtn", "bits": 4, "group_size": g}, False),
    }


def _reload(b: Bench, folder: Any) -> tuple[Any, dict[str, Any]]:
    """The folder loaded with ``AutoModelForCausalLM.from_pretrained(folder)`` and moved to the device;
    where that fails (an int4 layout without a CPU path), ``device_map`` onto the device, noted."""
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(folder)
        return model.to(b.device), {"reload": "from_pretrained(folder).to(device)", "plain_reload_ok": True}
    except Exception as exc:
        plain_error = last_line(exc)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=str(b.device))
    return model, {"reload": f"from_pretrained(folder, device_map={str(b.device)!r})", "plain_reload_ok": False,
                   "plain_reload_error": plain_error}


def quantize_case(b: Bench, out: dict[str, Any], name: str) -> None:
    from optjob.steps import quantize
    from optjob.steps.modeling import model_size_bytes, save_model

    options, cuda_only = cases(b)[name]
    out.update(unit="reloaded eval loss / recorded eval loss",
               goal=f"reloads with AutoModelForCausalLM.from_pretrained; loss within {TOLERANCE:.1%} of the recorded")
    if cuda_only:
        b.need_cuda()
    need_module("torchao")
    spec = b.spec([{"quantize": options}])
    step = spec.pipeline[0]
    quantize.preflight(step, b.device)
    model, source = b.trained_or_fresh()
    float_loss = b.eval_loss(model)
    outcome = quantize.run(b.context(spec, name), step, model)
    recorded = b.eval_loss(outcome.model)
    folder = save_model(outcome.model, b.tmp / name / "model", b.tokenizer)
    metrics = {k: outcome.metrics.get(k) for k in ("size_ratio", "float_dtype_after", "weight_rel_error",
                                                     "quantized_layers", "conversions", "device")}
    del outcome, model
    b.cleanup()
    reloaded_model, how = _reload(b, folder)
    reloaded = b.eval_loss(reloaded_model)
    del reloaded_model
    ratio = reloaded / recorded
    out["metrics"] = {"model": source, "eval_loss_float": float_loss, "eval_loss_recorded": recorded,
                      "eval_loss_reloaded": reloaded, "folder_mib": round(model_size_bytes(folder) / 2**20, 2),
                      **metrics, **how}
    out.update(figure=round(ratio, 6), met=abs(ratio - 1) <= TOLERANCE and how["plain_reload_ok"])
    if not (math.isfinite(recorded) and math.isfinite(reloaded)):
        raise CheckFailed(f"eval loss not finite: recorded {recorded}, reloaded {reloaded}")
    if abs(ratio - 1) > TOLERANCE:
        raise CheckFailed(f"the reloaded model's loss {reloaded:.5f} differs from the recorded {recorded:.5f} "
                          f"by {ratio - 1:+.3%}")
