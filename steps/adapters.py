"""Parameter-efficient fine-tuning through peft: LoRA on the model as it is, QLoRA on a 4-bit copy.

- ``attach`` wraps the model a training loop starts from (``train.adapter``). LoRA keeps the frozen
  weights in the dtype they came in (fp32 under ``precision: fp32``); QLoRA reloads them from the
  step's input (the previous step's folder, ``model.path``, the hub id, or a copy saved in
  ``steps/NN-train/base``) as 4-bit NF4 with bitsandbytes (CUDA only) and prepares them with
  ``prepare_model_for_kbit_training``. The adapter is initialised from the step's seed.
- ``trainable_state`` / ``load_trainable``: what a checkpoint holds of an adapted model: the adapter
  weights (the frozen base comes back from the step's input), so a resumed run equals a straight one.
- ``finish`` saves the adapter beside the step's model (``steps/NN-train/adapter``: peft's
  ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
  ``PeftModel.from_pretrained(base, folder)`` on the step's input model) and returns the merged
  model, which plain ``AutoModelForCausalLM.from_pretrained`` loads. A QLoRA adapter is merged into
  the base reloaded in its own dtype, not into the 4-bit copy.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from optjob.specs.errors import StepError
from optjob.specs.steps import AdapterSpec, TrainOptions
from torch import nn

from .context import StepContext

#: The adapter's folder inside the step's folder.
ADAPTER_DIR = "adapter"
#: Where a QLoRA step saves a base that exists only in memory (built from model.init) to reload it in 4-bit.
BASE_DIR = "base"
_COMPUTE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def adapter_of(opts: TrainOptions) -> AdapterSpec | None:
    """The adapter a train step's options ask for (distill has none)."""
    adapter = getattr(opts, "adapter", None)
    return adapter if isinstance(adapter, AdapterSpec) else None


def preflight(adapter: AdapterSpec, device: torch.device) -> None:
    """peft (and for QLoRA a CUDA device and bitsandbytes) before the pipeline starts."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise StepError("train.adapter needs peft: pip install 'optjob[workload]' (peft>=0.21,<0.22)") from None
    if adapter.method != "qlora":
        return
    if device.type != "cuda":
        raise StepError(f"adapter method qlora holds the model in 4-bit with bitsandbytes, which needs a CUDA GPU; "
                        f"this node runs on {device.type}", hint="use adapter.method: lora, or a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StepError("adapter method qlora needs bitsandbytes: pip install bitsandbytes") from None


def is_adapted(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_config(adapter: AdapterSpec) -> Any:
    from peft import LoraConfig

    targets: Any = adapter.targets if adapter.targets == "all-linear" else list(adapter.targets)
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def attach(ctx: StepContext, model: nn.Module, opts: TrainOptions) -> nn.Module:
    """``model`` (the step's input) with a fresh adapter, every other weight frozen."""
    from peft import get_peft_model

    adapter = adapter_of(opts)
    assert adapter is not None
    preflight(adapter, ctx.device)
    if adapter.method == "qlora":
        model = quantized_base(ctx, model, opts)
    elif opts.precision == "fp32":
        _upcast(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)  # the adapter's initial weights: same seed, same adapter
        try:
            adapted = get_peft_model(model, lora_config(adapter))
        except ValueError as exc:  # targets naming no module of this model
            raise StepError(f"train.adapter: {exc}") from None
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    print(f"adapter {adapter.method} r={adapter.r}: {trainable:,} trainable parameters", file=sys.stderr, flush=True)
    return adapted  # type: ignore[no-any-return]


def _upcast(model: nn.Module) -> None:
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.to(torch.float32)


def base_source(ctx: StepContext, model: nn.Module) -> str:
    """Where the step's input model can be loaded from: its folder, the hub id, or (a model built
    in memory) a copy saved in the step's folder."""
    if ctx.model_dir is not None and (Path(ctx.model_dir) / "config.json").exists():
        return str(ctx.model_dir)
    if ctx.spec.model.hf is not None and ctx.spec.model.init is None:
        return ctx.spec.model.hf
    from .modeling import save_model

    folder = ctx.step_dir() / BASE_DIR
    if not (folder / "config.json").exists():
        save_model(model, folder)
    return str(folder)


def _from_pretrained(source: str, tokenizer: Any, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        loaded: nn.Module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise StepError(f"could not load the base model {source!r}: {exc}") from None
    embeddings = loaded.get_input_embeddings()  # type: ignore[operator]
    if tokenizer is not None and embeddings is not None and embeddings.num_embeddings < len(tokenizer):
        loaded.resize_token_embeddings(len(tokenizer))  # type: ignore[operator]
    return loaded


def quantized_base(ctx: StepContext, model: nn.Module, opts: TrainOptions) -> nn.Module:  # pragma: no cover - CUDA
    """The step's input reloaded in 4-bit NF4 (double quantization, compute in the step's precision)
    on this process's GPU; the full-precision copy is moved off the GPU first."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    source = base_source(ctx, model)
    model.to("cpu")  # the runner's copy: off the GPU before the 4-bit one is loaded
    torch.cuda.empty_cache()
    compute = _COMPUTE[opts.precision]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    quantized = _from_pretrained(source, ctx.tokenizer, quantization_config=config, dtype=compute,
                                 device_map={"": index})
    return prepare_model_for_kbit_training(  # type: ignore[no-any-return]
        quantized, use_gradient_checkpointing=opts.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights an optimizer trains (an adapter's), by name: what a checkpoint keeps."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put checkpointed adapter weights back; the names must be exactly those ``model`` trains."""
    params = dict(model.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
        raise StepError(f"the checkpoint's adapter does not match this step's (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}); delete the step's checkpoints to start it over")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, folder: Path) -> Path:
    """peft's ``save_pretrained`` into a temporary folder beside ``folder``, then swapped in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        model.save_pretrained(str(tmp))  # type: ignore[operator]
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def finish(
    ctx: StepContext, model: nn.Module, adapter: AdapterSpec, *, save: bool = True
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Save the adapter (``save``: this process writes); (the merged model, its parameter counts
    for the metrics, where the adapter is for the record)."""
    trainable = count_trainable(model)
    folder = ctx.step_dir() / ADAPTER_DIR
    if save:
        save_adapter(model, folder)
    if adapter.method == "qlora":  # pragma: no cover - CUDA
        merged = _merge_qlora(ctx, model, adapter)
    else:
        merged = model.merge_and_unload()  # type: ignore[operator]
    from .modeling import count_params

    sizes = {"trainable_params": trainable, "params": count_params(merged)}
    return merged, sizes, {"adapter": str(folder), "adapter_method": adapter.method}


def _merge_qlora(ctx: StepContext, model: nn.Module, adapter: AdapterSpec) -> nn.Module:  # pragma: no cover - CUDA
    """The adapter merged into the base reloaded in its own dtype (merging into the 4-bit copy would
    quantize the update away), from the weights in memory (no shared disk needed under torchrun)."""
    from peft import get_peft_model

    state = {k: v.to("cpu", copy=True) for k, v in trainable_state(model).items()}
    source = base_source(ctx, model)
    del model
    torch.cuda.empty_cache()
    base = _from_pretrained(source, ctx.tokenizer, dtype="auto")
    adapted = get_peft_model(base, lora_config(adapter))
    load_trainable(adapted, {k: v.to(next(iter(adapted.parameters())).device) for k, v in state.items()})
    merged: nn.Module = adapted.merge_and_unload()  # type: ignore[operator]
    return merged.to(ctx.device)
