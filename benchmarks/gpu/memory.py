"""optjob's memory estimate (``manager/pricing/memory.py``'s ``train_memory`` on the model's ``Shape``)
against ``torch.cuda.max_memory_allocated`` over a real ``train_loop`` (full fine-tune, LoRA, gradient
checkpointing), and QLoRA (bitsandbytes 4-bit base): a few steps, its trainable parameters, its peak.

The estimate is taken without the CUDA context (``gpu=False``): the caching allocator does not see
the context, so ``max_memory_allocated`` cannot either; the estimate with it is recorded beside."""

from __future__ import annotations

import math
from typing import Any

from .bench import Bench
from .harness import CheckFailed, need_module

MIB = 2**20
#: The goal: the estimate within this fraction of the measured peak.
TOLERANCE = 0.15
#: Train options of each memory case (on top of ``Bench.train_options``).
CASES: dict[str, dict[str, Any]] = {
    "memory_full_fp32": {},
    "memory_full_bf16": {"precision": "bf16"},
    "memory_lora_bf16": {"precision": "bf16", "adapter": {"method": "lora", "r": 16}},
    "memory_gradient_checkpointing_bf16": {"precision": "bf16", "gradient_checkpointing": True},
}


def _mib(n: float) -> float:
    return round(n / MIB, 1)


def _estimate(b: Bench, spec: Any) -> dict[str, Any]:
    from optjob.manager.pricing.memory import train_memory
    from optjob.manager.pricing.model_shape import model_shape

    shape, _ = model_shape(spec.model)
    step = spec.pipeline[0]
    bare = train_memory(shape, step, b.sizes.seq_len, gpu=False)
    with_context = train_memory(shape, step, b.sizes.seq_len, gpu=True)
    return {"shape": shape, "total": bare.total, "metrics": {
        "estimate_mib": _mib(bare.total), "estimate_parts_mib": {k: _mib(v) for k, v in bare.parts.items()},
        "estimate_with_cuda_context_mib": _mib(with_context.total), "params": shape.params}}


def _peak(b: Bench, run: Any) -> tuple[Any, dict[str, float]]:
    """``run()``'s result, and the CUDA allocator's peak while it ran over what was allocated before."""
    import torch

    b.cleanup()
    before = torch.cuda.memory_allocated(b.device)
    torch.cuda.reset_peak_memory_stats(b.device)
    result = run()
    torch.cuda.synchronize(b.device)
    peak = torch.cuda.max_memory_allocated(b.device) - before
    return result, {"measured": peak, "allocated_before_mib": _mib(before),
                    "max_reserved_mib": _mib(torch.cuda.max_memory_reserved(b.device))}


def memory_case(b: Bench, out: dict[str, Any], train: dict[str, Any]) -> None:
    from optjob.steps.train import train_loop

    spec = b.spec([{"train": b.train_options(max_steps=b.sizes.memory_steps, **train)}])
    est = _estimate(b, spec)
    out.update(unit="estimate / measured peak", goal=f"within {TOLERANCE:.0%} of torch.cuda.max_memory_allocated",
               metrics=dict(est["metrics"]))
    if "adapter" in train:
        need_module("peft")
    b.need_cuda()
    ctx = b.context(spec, "memory")
    # The model is built on the CPU inside the measured call: train_loop moves it to the GPU.
    res, peak = _peak(b, lambda: train_loop(ctx, b.model(), spec.pipeline[0], checkpoints=False, emit=False))
    losses = [v for _, v in res.losses]
    del res
    ratio = est["total"] / peak["measured"]
    out["metrics"].update(measured_mib=_mib(peak["measured"]), allocated_before_mib=peak["allocated_before_mib"],
                          max_reserved_mib=peak["max_reserved_mib"], losses=losses)
    out.update(figure=round(ratio, 4), met=abs(ratio - 1) <= TOLERANCE)
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"a loss is not finite: {losses}")


def qlora(b: Bench, out: dict[str, Any]) -> None:
    """The train step with ``adapter: {method: qlora}``: loss finite, trainable parameters, peak memory
    against the estimate; then the adapter merged into the base in its own dtype (``adapters.finish``)."""
    from optjob.steps import adapters
    from optjob.steps.train import preflight, train_loop

    options = b.train_options(max_steps=b.sizes.qlora_steps, precision="bf16", adapter={"method": "qlora", "r": 16})
    spec = b.spec([{"train": options}])
    step = spec.pipeline[0]
    est = _estimate(b, spec)
    out.update(unit="estimate / measured peak", goal=f"loss finite; estimate within {TOLERANCE:.0%} of the peak",
               metrics=dict(est["metrics"]))
    need_module("peft")
    b.need_cuda()
    need_module("bitsandbytes")
    preflight(step, b.device)
    ctx = b.context(spec, "qlora")
    res, peak = _peak(b, lambda: train_loop(ctx, b.model(), step, checkpoints=False, emit=False))
    losses = [v for _, v in res.losses]
    trainable = adapters.count_trainable(res.model)
    expected = est["shape"].lora_params(step.adapter)
    ratio = est["total"] / peak["measured"]
    out["metrics"].update(measured_mib=_mib(peak["measured"]), max_reserved_mib=peak["max_reserved_mib"],
                          losses=losses, trainable_params=trainable, trainable_params_estimated=expected)
    out.update(figure=round(ratio, 4), met=abs(ratio - 1) <= TOLERANCE)
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"a loss is not finite: {losses}")
    adapted_loss = b.eval_loss(res.model)
    merged, sizes, _ = adapters.finish(ctx, res.model, step.adapter)
    del res
    merged_loss = b.eval_loss(merged)
    out["metrics"].update(eval_loss_adapted_4bit=adapted_loss, eval_loss_merged=merged_loss,
                          merged_params=sizes["params"])
    if not math.isfinite(merged_loss):
        raise CheckFailed(f"the merged model's eval loss is {merged_loss}")
