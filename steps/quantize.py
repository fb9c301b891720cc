"""``quantize``: shrink the current model's weights.

========== =================================================== ================
method     how                                                 runs on
========== =================================================== ================
fp16       cast                                                cpu, cuda
bf16       cast                                                cpu, cuda
int8-dyn.  torch.ao.quantization.quantize_dynamic (nn.Linear)  cpu only
int8-wt.   torchao Int8WeightOnlyConfig                        cpu, cuda
int4-wt.   torchao Int4WeightOnlyConfig (tinygemm, bf16)       cuda (sm80+)
========== =================================================== ================

Casts save as ordinary ``save_pretrained`` checkpoints. The int methods produce
modules that cannot ``save_pretrained``, so the model gets an ``optjob_save`` hook
(the runner's ``save_model`` calls it) that writes the recipe (``optjob_quant.json``),
the float ``config.json`` and the quantized state dict; ``load_quantized`` rebuilds
the float model, quantizes it the same way and loads that state dict.

int8-dynamic modules only run on the CPU, so ``preflight`` refuses it on other devices
(the steps after it evaluate on the job's device).
"""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from optjob.specs import QuantizeStep
from optjob.specs.errors import StepError
from torch import nn

from .context import StepContext, StepOutcome

RECIPE_FILE = "optjob_quant.json"
STATE_FILE = "quantized_state.pt"
FORMAT_VERSION = 1
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
CPU_METHODS = ("fp16", "bf16", "int8-dynamic", "int8-weight")


def preflight(step: QuantizeStep, device: torch.device) -> None:
    """Refuse a method the device cannot run, before any step runs."""
    if step.method == "int8-dynamic" and device.type != "cpu":
        raise StepError(
            f"int8-dynamic (torch dynamic quantization) runs on the CPU only, and this job "
            f"runs on {device.type}; use int8-weight (or int4-weight on a GPU)"
        )
    if step.method != "int4-weight":
        return
    if device.type != "cuda":
        raise StepError(
            "int4-weight needs a CUDA GPU (torchao 0.18 has no CPU kernel for it); "
            "use int8-weight on CPU"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise StepError(
            f"int4-weight needs a GPU of compute capability 8.0 or newer (this one is "
            f"{major}.{minor}); use int8-weight"
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization and torchao warn about deprecations on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _torchao_config(method: str, group_size: int) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if method == "int8-weight":
        return Int8WeightOnlyConfig()
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")


def _config(model: nn.Module) -> Any:
    return model.config


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, but non-persistent buffers (rotary tables) keep their dtype,
    as they do when ``from_pretrained`` rebuilds the model: the cast model in memory and
    its reload compute the same thing."""
    kept = []
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                kept.append((module, name, buf))
    model.to(dtype)
    for module, name, buf in kept:
        module._buffers[name] = buf
    return model


def quantize_model(
    model: nn.Module, method: str, group_size: int = 128, device: torch.device | None = None
) -> nn.Module:
    """Quantize ``model`` in place (returned). int8-dynamic moves it to the CPU;
    int4-weight casts it to bf16 first (the tinygemm kernel's only dtype)."""
    model.eval()
    if method in CASTS:
        return cast(model, CASTS[method])
    if method == "int8-dynamic":
        with _quiet():
            return torch.ao.quantization.quantize_dynamic(
                model.to("cpu"), {nn.Linear}, dtype=torch.qint8, inplace=True
            )
    if method not in ("int8-weight", "int4-weight"):
        raise StepError(f"unknown quantization method {method!r}")
    from torchao.quantization import quantize_

    if device is not None:
        model.to(device)
    if method == "int4-weight":
        model.to(torch.bfloat16)
    with _quiet():
        quantize_(model, _torchao_config(method, group_size))
    return model


class _Counter:
    """A write-only sink that counts bytes (torch.save without the copy)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: comparable across float and
    quantized models (packed int8 weights included)."""
    counter = _Counter()
    with _quiet():
        torch.save(model.state_dict(), counter)  # type: ignore[arg-type]
    return counter.n


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def recipe_for(model: nn.Module, method: str, group_size: int, float_dtype: torch.dtype) -> dict:
    return {
        "format": FORMAT_VERSION,
        "method": method,
        "group_size": group_size,
        "model_class": type(model).__name__,
        "float_dtype": str(float_dtype).removeprefix("torch."),
        "state_dict": STATE_FILE,
        "base_config": _config(model).to_dict(),
        "versions": {n: _version(n) for n in ("torch", "torchao", "transformers")},
    }


def save_quantized(model: nn.Module, path: Path, recipe: dict[str, Any]) -> None:
    """Write recipe + float config + quantized state dict into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _config(model).save_pretrained(path)
    with _quiet():
        torch.save(model.state_dict(), path / STATE_FILE)
    (path / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))


def attach_saver(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    model.optjob_save = lambda d: save_quantized(model, Path(d), recipe)  # type: ignore[assignment]
    model.optjob_quant = recipe  # type: ignore[assignment]
    return model


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / RECIPE_FILE).exists()


def load_quantized(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model written by ``save_quantized``."""
    path = Path(path)
    recipe = json.loads((path / RECIPE_FILE).read_text())
    if recipe.get("format") != FORMAT_VERSION:
        raise StepError(f"{path}: unknown quantized-model format {recipe.get('format')!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, recipe["model_class"], None)
    if cls is None:
        cls = transformers.AutoModelForCausalLM.from_config
    model = cls(config)
    model.to(getattr(torch, recipe["float_dtype"]))
    device = torch.device(device)
    if recipe["method"] == "int8-dynamic":
        device = torch.device("cpu")
    model = quantize_model(model, recipe["method"], recipe["group_size"], device)
    with _quiet():
        state = torch.load(path / recipe["state_dict"], map_location=device, weights_only=True)
    model.load_state_dict(state, assign=recipe["method"] != "int8-dynamic")
    model.eval()
    return attach_saver(model, recipe)


def run(ctx: StepContext, step: QuantizeStep, model: nn.Module) -> StepOutcome:
    before = state_dict_bytes(model)
    float_dtype = _float_dtype(model)
    recipe = recipe_for(model, step.method, step.group_size, float_dtype)
    model = quantize_model(model, step.method, step.group_size, ctx.device)
    if step.method not in CASTS:
        attach_saver(model, recipe)
    after = state_dict_bytes(model)
    device = next(iter(model.state_dict().values())).device
    metrics = {
        "method": step.method,
        "size_bytes_before": before,
        "size_bytes_after": after,
        "size_ratio": after / before if before else None,
        "device": str(device),
    }
    return StepOutcome(model=model, metrics=metrics)
